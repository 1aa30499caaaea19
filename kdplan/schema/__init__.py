"""Versioned pydantic contracts for every file that crosses a boundary."""

from .cluster import (
    ClusterFile,
    ClusterProfile,
    ComputeEfficiency,
    GPUGroup,
    GPUSpec,
    HardwareFile,
    Link,
    NodeSpec,
    Overheads,
    PeakCompute,
    Provenance,
)
from .common import SCHEMA_VERSION, Strict, Versioned, schema_version_error
from .job import JobSpec, KDSettings, RunSettings, SolverSettings
from .model import MLASpec, ModelSpec, MoESpec
from .plan import (
    Alternative,
    BaselinePrediction,
    Baselines,
    ExecutorCheck,
    JobSummary,
    KDPlan,
    Layout,
    MemoryBreakdown,
    OfflineCost,
    GenerationCost,
    Plan,
    Prediction,
    RolePlan,
    SolverInfo,
    Stage,
)
from .report import LossPoint, Measured, PlanRef, Restart, RunReport, StudentMeasured

__all__ = [name for name in dir() if not name.startswith("_")]
