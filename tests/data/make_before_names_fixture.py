# How tests/data/digits_int8_before_names.trtopt was written: with trtopt at commit 65c4ff6
# (before node names and module paths), from the repository root:
#   PYTHONPATH=. python tests/data/make_before_names_fixture.py
# Kept to prove that module files written before that change still load; do not regenerate it.
import numpy as np, torch, trtopt, json
from tests._digits import load_digits, train, DigitsCNN
print(trtopt.__file__)
torch.manual_seed(0)
d = load_digits()
m = train(DigitsCNN, d, epochs=3)
fast = trtopt.compile(m, (d.test_x[:4],), precision="int8", calibration_data=d.calibration_batches(),
                      dynamic_shapes={"x": {0: (1, 4, 8)}}, backend="onnxruntime")
fast.save("tests/data/digits_int8_before_names.trtopt")
x = d.test_x[:8]
np.savez("tests/data/digits_int8_before_names_io.npz", x=x.numpy(), y=fast(x).numpy())
print(fast.precision_report.not_quantized, fast.precision_report.kept_fp32)
print([n.name for n in fast.onnx_model.graph.node][:10])
