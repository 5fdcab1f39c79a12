import sys
"""Dump the CIFAR-10 holdout parts' logits, path rows and probe columns for an offline error-detector study."""
import numpy as np, torch
torch.set_num_threads(1)
from nad_guard.data import load_dataset
from nad_guard.evaluate import EvalConfig
from nad_guard.evaluate.data import EvalData
from nad_guard.evaluate.features import CALIBRATION_CLEAN, EVALUATION_CLEAN, EVALUATION_WRONG, FIT_CLEAN, FIT_WRONG
from nad_guard.guard import artifact_classifier
from nad_guard.paths import PathModel
from nad_guard.attacks import default_cache_dir
train, test = load_dataset("cifar10")
art = "bench/results/guard_cifar10-resnet20"
paths = PathModel.load(art, artifact_classifier(art, "cifar10-resnet20", None, class_names=train.classes, input_size=32, channels=3))
cfg = EvalConfig(suite="cifar10", attacks=["fgsm"], protocols=["mispredictions"], probes=4, max_images=3000, progress=False,
                 encodings=["rich", "summary"], methods=["logistic"])
d = EvalData(paths, train, test, cfg, default_cache_dir(), print)
out = {}
for name, k in dict(fit_clean=FIT_CLEAN, fit_wrong=FIT_WRONG, cal=CALIBRATION_CLEAN, ev_clean=EVALUATION_CLEAN, ev_wrong=EVALUATION_WRONG).items():
    fs = d.features[k]
    out[name + "_logits"] = np.asarray(fs.base.logits)
    out[name + "_rich"] = fs.path["rich"]
    out[name + "_summary"] = fs.path["summary"]
    out[name + "_probes"] = fs.extra["probes"]
from nad_guard.probes import probe_column_names
np.savez(sys.argv[1], names=np.array(probe_column_names(paths.layer_names_, cfg.probe_spec())), **out)
print({k: v.shape for k, v in out.items()})
