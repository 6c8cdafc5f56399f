"""Export a checkpoint: ``python -m cxr_lightning.export ckpt_path=PATH format=onnx|torchscript``
(:func:`cxr_lightning.tasks.export.export`)."""
from cxr_lightning.cli import export_main

if __name__ == "__main__":
    export_main()
