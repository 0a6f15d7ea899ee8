"""reduce-ops: retrain one DNN for a fleet of faulty systolic-array chips at the lowest cost."""


def load_chip_model(chip_id: str, tracking_uri: str | None = None,
                    prefix: str | None = None):  # noqa: ANN201 - torch.nn.Module, lazily
    """A chip's champion model: a trainable torch nn.Module in eval mode, rebuilt from the
    champion's chip_model.pt (state_dict + arch). Works from any folder: the tracking URI is
    `tracking_uri` or MLFLOW_TRACKING_URI; the chip's registered model is found by its chip_id
    tag (`prefix` picks one when several registry prefixes share a server). For the pt2 export
    instead (a GraphModule, inference only):
    mlflow.pytorch.load_model("models:/<prefix>-<chip_id>@champion").
    An unknown chip id raises reduce_ops.errors.TrackingError naming close matches."""
    from reduce_ops.registry import (
        load_chip_model as _load,  # lazy: `import reduce_ops` stays light
    )

    return _load(chip_id, tracking_uri=tracking_uri, prefix=prefix)

