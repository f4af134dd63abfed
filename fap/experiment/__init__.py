"""Experiments as a feature: arms x seeds of ordinary fap runs, and paired statistics over them.

The question a user asks first -- does Fast AdvProp (Mei et al., ICLR 2022) or AdvProp (Xie et
al., CVPR 2020) help *my* model on *my* data at equal compute? -- is an experiment: a base
config, named arms that each change a few settings, seeds, a protocol (equal epochs, or equal
compute from the methods' own cost ledger), and contrasts declared before the runs.
``fap compare`` (`fap.experiment.cli`) and `run` here run it; each (arm, seed) is an ordinary
run directory (``fap eval`` and ``fap export`` work on it), and a killed experiment started
again reuses finished runs and resumes unfinished ones.

Parts, in reading order:

* `fap.experiment.plan`: arms, contrasts, protocols, and one `TrainConfig` per (arm, seed);
* `fap.experiment.runner`: the run directories, reuse, N runs at a time, the measurements;
* `fap.experiment.stats`: per-arm summaries and paired contrasts (scipy);
* `fap.experiment.report`: ``results.json``, ``report.md``, the plot and the headline table.
"""
from fap.experiment.plan import PROTOCOLS, Arm, Contrast, Plan, RunPlan, make_plan
from fap.experiment.report import Results, load_results
from fap.experiment.runner import ExperimentError, run

__all__ = ["PROTOCOLS", "Arm", "Contrast", "ExperimentError", "Plan", "Results", "RunPlan", "load_results",
           "make_plan", "run"]
