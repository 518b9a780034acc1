"""Downstream contamination paths: classifiers trained on real data mixed with generated images.

- mixing.py      training sets per mode: substitute, augment, control, generations (not loop policies)
- shifts.py      shifted test sets (the CIFAR-10-C corruptions at their published severities)
- bias.py        bias metrics of classifiers and generators on attribute-labelled data
- sources.py     labelled generated images: a loop run's generation t, or a generator trained on the spot
- grid.py        the cell grid (reference, baselines, mode x ratio x seed), one committed cell at a time
- robustness.py  effective robustness: the logit-linear baseline fit and distances from it
- report.py      summary tables and figures from contamination run directories alone
- cli.py         the hydra entry point `simulate-contaminate` (configs/contaminate.yaml)

Related modules: simulator.classifiers (the downstream classifiers, MLP, CNN, ResNet-18, and their
training: the curation reward loads them too), simulator.data.colored (the attribute-labelled coloured
digits).
"""

from simulator.contamination.mixing import MODES, ContaminationError, Mixture, Pool, mix

__all__ = ["MODES", "ContaminationError", "Mixture", "Pool", "mix"]
