"""Executor models: HF configs by family, meta build, sharding-independent seeded init, checkpoints,
vocabulary check. The distributed part runs 2 gloo processes once (TP and FSDP2 in the same launch)."""

import os

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from executor import models  # noqa: E402
from kdplan.schema import ModelSpec  # noqa: E402
from conftest import init_gloo, spawn_gloo  # noqa: E402
from executor.mesh import close_process_group  # noqa: E402

pytestmark = pytest.mark.executor


def spec(family="llama", **kw):
    base = dict(name="tiny", family=family, num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2,
                ffn_hidden_size=96, vocab_size=128, max_positions=32)
    base.update(kw)
    return ModelSpec(**base)


@pytest.mark.parametrize("family,cls", [("llama", "LlamaForCausalLM"), ("mistral", "MistralForCausalLM"),
                                        ("qwen2", "Qwen2ForCausalLM"), ("gpt", "LlamaForCausalLM")])
def test_build_on_meta_by_family(family, cls):
    m = models.build_model(spec(family))
    assert type(m).__name__ == cls
    assert all(p.is_meta for p in m.parameters())
    cfg = m.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_key_value_heads, cfg.vocab_size) == (2, 64, 2, 128)
    assert cfg.attention_dropout == 0.0
    if family == "llama":  # parameter count equals the planner's formula for the families that run natively
        assert sum(p.numel() for p in m.parameters()) == spec().num_params()


def test_materialize_is_deterministic_and_runs():
    a = models.materialize(models.build_model(spec()), seed=3)
    b = models.materialize(models.build_model(spec()), seed=3)
    c = models.materialize(models.build_model(spec()), seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.layers.0.self_attn.q_proj.weight"], sc["model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(sa["model.norm.weight"], torch.ones(64))
    assert sa["model.embed_tokens.weight"].std().item() == pytest.approx(0.02, rel=0.1)
    # rotary buffers were rebuilt (to_empty leaves garbage in them)
    ref = models.build_model(spec(), device="cpu")
    torch.testing.assert_close(a.model.rotary_emb.inv_freq, ref.model.rotary_emb.inv_freq)
    x = torch.randint(0, 128, (2, 16))
    logits = a(input_ids=x).logits
    assert logits.shape == (2, 16, 128) and torch.isfinite(logits).all()


def test_tied_embeddings_and_qkv_bias():
    m = models.materialize(models.build_model(spec(tied_embeddings=True, qkv_bias=True)), seed=0)
    assert m.lm_head.weight is m.model.embed_tokens.weight
    assert torch.equal(m.model.layers[0].self_attn.q_proj.bias, torch.zeros(64))


def test_save_load_round_trip(tmp_path):
    m = models.materialize(models.build_model(spec(tied_embeddings=True)), seed=1)
    out = models.save_checkpoint(m, tmp_path / "ckpt")
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temporary left behind
    m2 = models.load_checkpoint(models.build_model(spec(tied_embeddings=True)), out)
    x = torch.randint(0, 128, (1, 8))
    torch.testing.assert_close(m(input_ids=x).logits, m2(input_ids=x).logits, rtol=0, atol=0)
    # overwrite in place (atomic replace of an existing directory)
    models.save_checkpoint(models.materialize(models.build_model(spec(tied_embeddings=True)), seed=2), out)
    m3 = models.load_checkpoint(models.build_model(spec(tied_embeddings=True)), out)
    assert not torch.equal(m3.model.embed_tokens.weight, m.model.embed_tokens.weight)
    # HF itself reads what we wrote
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(out))
    torch.testing.assert_close(hf(input_ids=x).logits, m3(input_ids=x).logits)
    with pytest.raises(ValueError, match="shape"):
        models.load_checkpoint(models.build_model(spec(hidden_size=32, tied_embeddings=True)), out)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        models.load_checkpoint(models.build_model(spec()), tmp_path)


def test_check_vocab():
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models as tm

    def tok(vocab):
        return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(tm.WordLevel(vocab, unk_token="u")))

    a = tok({"u": 0, "x": 1, "y": 2})
    models.check_vocab(a, tok({"u": 0, "x": 1, "y": 2}))
    with pytest.raises(ValueError, match="different ids .*'x': teacher 1, student 2"):
        models.check_vocab(a, tok({"u": 0, "y": 1, "x": 2}))  # same size, different map
    with pytest.raises(ValueError, match="only in the student"):
        models.check_vocab(a, tok({"u": 0, "x": 1, "y": 2, "z": 3}))


# ---- two gloo processes: TP and FSDP2 shards equal the single-process weights ---------------------


def _worker(rank, world, port, q):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    torch.set_num_threads(1)
    init_gloo(rank, world, port)
    try:
        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
        ref = models.materialize(models.build_model(spec()), seed=7)
        x = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
        ref_logits = ref(input_ids=x).logits
        errs = {}
        # tensor parallel (sdpa attention on local heads)
        tp = models.build_model(spec())
        plan = {"self_attn.q_proj": ColwiseParallel(), "self_attn.k_proj": ColwiseParallel(),
                "self_attn.v_proj": ColwiseParallel(), "self_attn.o_proj": RowwiseParallel(),
                "mlp.gate_proj": ColwiseParallel(), "mlp.up_proj": ColwiseParallel(), "mlp.down_proj": RowwiseParallel()}
        for layer in tp.model.layers:
            parallelize_module(layer, mesh, plan)
        models.materialize(tp, seed=7)
        full = models.full_state_dict(tp)
        errs["tp_weights"] = max((full[k] - v).abs().max().item() for k, v in models.full_state_dict(ref).items())
        errs["tp_logits"] = (tp(input_ids=x).logits - ref_logits).abs().max().item()
        # FSDP2, then a checkpoint written by rank 0 and loaded into the sharded model
        fs = models.build_model(spec())
        for layer in fs.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(fs, mesh=mesh)
        models.materialize(fs, seed=7)
        full = models.full_state_dict(fs)
        errs["fsdp_weights"] = max((full[k] - v).abs().max().item() for k, v in models.full_state_dict(ref).items())
        errs["fsdp_logits"] = (fs(input_ids=x).logits - ref_logits).abs().max().item()
        path = os.path.join(os.environ["KD_TEST_TMP"], "ckpt")
        models.save_checkpoint(fs, path)
        dist.barrier()
        tp2 = models.build_model(spec())
        for layer in tp2.model.layers:
            parallelize_module(layer, mesh, plan)
        models.load_checkpoint(tp2, path)
        errs["tp_loaded_logits"] = (tp2(input_ids=x).logits - ref_logits).abs().max().item()
        q.put((rank, errs))
    finally:
        close_process_group()


@pytest.mark.slow
def test_sharded_materialize_equals_single_process(tmp_path, monkeypatch):
    monkeypatch.setenv("KD_TEST_TMP", str(tmp_path))
    results = spawn_gloo(_worker, 2)
    for rank, errs in results.items():
        assert errs["tp_weights"] == 0 and errs["fsdp_weights"] == 0, errs
        for k in ("tp_logits", "fsdp_logits", "tp_loaded_logits"):
            assert errs[k] < 1e-5, (rank, errs)


def test_checkpoint_load_reads_only_the_local_shard_in_the_model_dtype(tmp_path, monkeypatch):
    """Issue 12 item 13: each rank reads its own block of every tensor (safe_open + get_slice), in
    the stored dtype, straight into a bf16 model: no full read, no fp32 copy. One process plays
    rank 1 of 2 on a fake process group (DTensors sharded on dim 0 and 1, and replicated)."""
    import safetensors
    import torch.distributed as dist
    from safetensors.torch import save_file
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    from torch.testing._internal.distributed.fake_pg import FakeStore
    from torch.utils._python_dispatch import TorchDispatchMode

    g = torch.Generator().manual_seed(0)
    full = {"layers.0.col.weight": torch.randn(10, 6, generator=g).bfloat16(),  # rank 1: rows 5..9
            "layers.0.row.weight": torch.randn(4, 9, generator=g).bfloat16(),   # rank 1: columns 5..8 (uneven)
            "norm.weight": torch.randn(6, generator=g).bfloat16()}
    save_file(full, str(tmp_path / "model.safetensors"))
    dist.init_process_group("fake", store=FakeStore(), rank=1, world_size=2)
    try:
        mesh = init_device_mesh("cpu", (2,))
        placements = {"layers.0.col.weight": Shard(0), "layers.0.row.weight": Shard(1), "norm.weight": Replicate()}
        model = nn.Module()
        for key, pl in placements.items():
            shape = full[key].shape
            lshape, _ = compute_local_shape_and_global_offset(shape, mesh, [pl])
            local = torch.zeros(lshape, dtype=torch.bfloat16)
            p = nn.Parameter(DTensor.from_local(local, mesh, [pl], run_check=False, shape=shape,
                                                stride=torch.empty(shape).stride()))
            mod = model
            *path, leaf = key.split(".")
            for part in path:
                if not hasattr(mod, part):
                    mod.add_module(part, nn.Module())
                mod = getattr(mod, part)
            mod.register_parameter(leaf, p)

        reads = []
        real_open = safetensors.safe_open

        class Spy:
            def __init__(self, *a, **k):
                self.f = real_open(*a, **k)

            def __enter__(self):
                self.f.__enter__()
                return self

            def __exit__(self, *a):
                return self.f.__exit__(*a)

            def keys(self):
                return self.f.keys()

            def get_slice(self, key):
                sl = self.f.get_slice(key)

                class S:
                    def get_shape(self):
                        return sl.get_shape()

                    def __getitem__(self, idx):
                        out = sl[idx]
                        reads.append((key, out.numel()))
                        return out
                return S()

            def get_tensor(self, key):
                pytest.fail(f"full read of {key}")

        class NoFloat32(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in torch.utils._pytree.tree_leaves(out):
                    if isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.numel() > 1:
                        raise AssertionError(f"fp32 tensor {tuple(t.shape)} made by {func}")
                return out

        monkeypatch.setattr(safetensors, "safe_open", Spy)
        with NoFloat32():
            models.load_checkpoint(model, tmp_path)
        got = {n: p.to_local() for n, p in model.named_parameters()}
        assert torch.equal(got["layers.0.col.weight"], full["layers.0.col.weight"][5:])
        assert torch.equal(got["layers.0.row.weight"], full["layers.0.row.weight"][:, 5:])
        assert torch.equal(got["norm.weight"], full["norm.weight"])
        assert all(t.dtype == torch.bfloat16 for t in got.values())
        # what was read: the local block of each sharded tensor, all of the replicated one
        assert sorted(reads) == [("layers.0.col.weight", 30), ("layers.0.row.weight", 16), ("norm.weight", 6)]
    finally:
        dist.destroy_process_group()
