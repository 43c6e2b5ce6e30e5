"""ORT's u8 x s8 MatMulInteger rate (GMAC/s) on this machine, 1 and 2 threads: whether its int8
kernels run above what AVX-512 VNNI can issue (they do where MLAS uses AMX)."""

import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

M = K = N = 512
rng = np.random.default_rng(0)
w = numpy_helper.from_array(rng.integers(-128, 127, (K, N)).astype(np.int8), "w")
graph = helper.make_graph([helper.make_node("MatMulInteger", ["a", "w"], ["y"])], "g",
                          [helper.make_tensor_value_info("a", TensorProto.UINT8, [M, K])],
                          [helper.make_tensor_value_info("y", TensorProto.INT32, [M, N])], [w])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
model.ir_version = 8
a = rng.integers(0, 255, (M, K)).astype(np.uint8)
for threads in (1, 2):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    for _ in range(5):
        session.run(None, {"a": a})
    times = []
    for _ in range(50):
        t0 = time.perf_counter()
        session.run(None, {"a": a})
        times.append(time.perf_counter() - t0)
    t = float(np.median(times))
    print(f"{threads} thread(s): {t * 1e3:.3f} ms, {M * K * N / t / 1e9:.0f} GMAC/s")
