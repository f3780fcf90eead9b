"""DCCNN (seed 001) in a scikit-learn Pipeline + GridSearchCV on the embedded 8x8 digits.

The kernel-only dual (loss="hinge", feature_map="exact"): no random features, a certified duality
gap per one-vs-rest problem, filters recovered from the active eigenspace, export to a torch CNN.
Run: PYTHONPATH=src python examples/001_dccnn.py  (about 15 s of CPU)
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # shared CPUs: torch's default spinning is slow

import numpy as np
import torch
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer

from proxnets.convex import DCCNN, certificate, to_torch
from proxnets.data import load_dataset

torch.set_num_threads(1)
ds = load_dataset("digits", n_train=100, n_test=300)  # real embedded data (UCI 8x8 digits)
x_train, y_train = ds.x_train.numpy().reshape(100, -1), ds.y_train.numpy()  # rows of 64 pixels
x_test, y_test = ds.x_test.numpy().reshape(len(ds.y_test), -1), ds.y_test.numpy()

pipe = Pipeline([
    ("float", FunctionTransformer(np.float32)),  # any preprocessing step fits here
    ("dccnn", DCCNN(loss="hinge", feature_map="exact", kernel="rbf", gamma=0.2, image_shape=(1, 8, 8),
                    patch_size=3, pool_size=2, max_iter=25, tol=1e-3, on_nonconvergence="ignore")),
])
search = GridSearchCV(pipe, {"dccnn__C": [0.1, 1.0]}, cv=2).fit(x_train, y_train)
best = search.best_estimator_.named_steps["dccnn"]
print(f"best C = {search.best_params_['dccnn__C']}, test accuracy {search.score(x_test, y_test):.3f}")
print(f"relative duality gap per one-vs-rest problem: {np.array2string(best.duality_gap_, precision=4)}")
print(f"recovered filters per problem (multiplicity of the active eigenvalue): {best.n_filters_.tolist()}")
print(f"support vectors: {len(best.support_)} of {len(y_train)} images")
for cert in certificate(best)[:2]:  # the one-vs-rest sums: relative gap, weak duality over all iterates
    print(cert.line())
net = to_torch(best)  # nn.Conv2d whitening + random-feature map + 1x1 Conv2d filters + nn.Linear head
with torch.no_grad():
    agree = (net(ds.x_test).argmax(1).numpy() == best.predict(x_test)).mean()
print(f"exported torch CNN (RBF through {best.n_features} random features) agrees on {agree:.1%} of test images")
