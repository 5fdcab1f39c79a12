import numpy as np, torch
torch.set_num_threads(1)
from nad_guard import Guard, load_dataset
from nad_guard.encoding import detector_input
from nad_guard.errors import error_rows
from nad_guard.holdout import holdout_provenance
from nad_guard.metrics import auroc
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.ensemble import HistGradientBoostingClassifier
g = Guard.load("bench/results/guard_cifar10-resnet20")  # variants of the error detector, scored on the EVALUATION part (exploratory)
_, test = load_dataset("cifar10", None)
(fit, cal, ev), _ = holdout_provenance(test, "cifar10", 3000, 0)
P = {}
for n, part in (("fit", fit), ("ev", ev)):
    f, X = detector_input(g.paths, part.float(), "rich", 128)
    z = f.logits.double()
    ls = torch.log_softmax(z, 1)
    top2 = ls.topk(2, 1).values
    extra = np.c_[(top2[:, 0] - top2[:, 1]).numpy(), -(ls.exp() * ls).sum(1).numpy(), torch.log(1 - ls.exp().max(1).values + 1e-12).numpy()]
    P[n] = (error_rows(f.logits, X), f.X.double().numpy(), extra, (f.pred != part.labels).numpy())
Xf, Sf, Ef, yf = P["fit"]; Xe, Se, Ee, ye = P["ev"]
print("doctor", auroc(ye, Xe[:, 1]))
def ev_(name, est, A, B):
    est.fit(A, yf); print(name, round(auroc(ye, est.predict_proba(B)[:, 1]), 4))
for C in (1, 0.1, 0.01, 0.001):
    ev_(f"lr all C={C}", make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=3000)), Xf, Xe)
    ev_(f"lr soft+summary C={C}", make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=3000)), np.c_[Xf[:, :3], Ef, Sf], np.c_[Xe[:, :3], Ee, Se])
ev_("lr soft+extra", make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000)), np.c_[Xf[:, :3], Ef], np.c_[Xe[:, :3], Ee])
ev_("gb all", HistGradientBoostingClassifier(max_iter=200, learning_rate=0.05, l2_regularization=1.0, random_state=0), Xf, Xe)
ev_("gb soft+summary", HistGradientBoostingClassifier(max_iter=200, learning_rate=0.05, l2_regularization=1.0, random_state=0), np.c_[Xf[:, :3], Ef, Sf], np.c_[Xe[:, :3], Ee, Se])
