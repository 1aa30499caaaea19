"""kdplan.search: from a resolved problem to the chosen configuration, in three stages.

- enumerate (``candidates``): what could run, before any price: placement arrangements, every
  valid layout of each role that the pins allow, the teacher-output formats; ``mixed`` splits
  layers over GPU groups of different speed.
- price (``space``): each arrangement x format, its layouts priced by the cost model (a
  ``Pricer``), pruned to those that fit and can win, as ILP blocks (``PricedSpace``).
- choose (``choose``): the selection policy, in order: the optimum of the ILP (``ilp``, the
  formulation), the teacher-precision and fidelity ladders, the bytes tie-break, the runner-ups.

Around them: ``diagnose`` (why nothing fits, and the nearest thing that does), ``decode``
(the chosen configuration as plan pieces), ``bruteforce`` (the ILP's proof on small problems).
kdplan.planner runs the stages and builds the plan.
"""
