"""``python -m cxr_lightning.explain ckpt_path=PATH|run_dir=DIR [split=test n=16 | images=[...]] [key=value ...]``

Thin Hydra entry (conf/explain.yaml) around :func:`cxr_lightning.explain.job.explain`.
"""
from __future__ import annotations

import hydra
from omegaconf import DictConfig, OmegaConf

from cxr_lightning.explain.job import explain, job_output_dir

# Hydra's run dir (log, .hydra/) follows the job's output dir; see conf/explain.yaml.
OmegaConf.register_new_resolver(
    "cxr.explain_dir", lambda explicit, run_dir, fallback: str(job_output_dir(explicit, run_dir, fallback)),
    replace=True,
)


@hydra.main(version_base="1.3", config_path="../../conf", config_name="explain")
def main(cfg: DictConfig) -> None:
    explain(cfg)


if __name__ == "__main__":
    main()
