"""Is onnxruntime a faster dense backend than numpy/BLAS for one-token decode projections?

Builds one ONNX graph holding every projection of a SmolLM2-shaped model (30 layers × 7,
float32, random weights) and times one decode step's projections in onnxruntime against
the numpy loop the engine uses, both single-threaded, interleaved, in one run.
Usage: python benchmarks/ort_vs_numpy.py [--layers 30] [--reps 7]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

SHAPES = {"q": (576, 576), "k": (576, 192), "v": (576, 192), "o": (576, 576),
          "gate": (576, 1536), "up": (576, 1536), "down": (1536, 576)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args()
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    ws = {f"{il}.{n}": rng.standard_normal(s).astype(np.float32) / 24
          for il in range(args.layers) for n, s in SHAPES.items()}
    nodes, outs = [], []
    for name, w in ws.items():
        src = "x1536" if w.shape[0] == 1536 else "x576"
        nodes.append(helper.make_node("MatMul", [src, "w" + name], ["y" + name]))
        outs.append(helper.make_tensor_value_info("y" + name, TensorProto.FLOAT, [1, w.shape[1]]))
    graph = helper.make_graph(
        nodes, "proj", [helper.make_tensor_value_info("x576", TensorProto.FLOAT, [1, 576]),
                        helper.make_tensor_value_info("x1536", TensorProto.FLOAT, [1, 1536])],
        outs, [numpy_helper.from_array(w, "w" + n) for n, w in ws.items()])
    model = onnx.helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    x = {"x576": rng.standard_normal((1, 576)).astype(np.float32),
         "x1536": rng.standard_normal((1, 1536)).astype(np.float32)}

    def numpy_step() -> None:
        for w in ws.values():
            _ = x["x1536" if w.shape[0] == 1536 else "x576"] @ w

    def ort_step() -> None:
        sess.run(None, x)

    t_np, t_ort = [], []
    for _ in range(args.reps):  # interleaved: the same machine state for both
        t = time.perf_counter()
        numpy_step()
        t_np.append(time.perf_counter() - t)
        t = time.perf_counter()
        ort_step()
        t_ort.append(time.perf_counter() - t)
    a, b = np.median(t_np) * 1e3, np.median(t_ort) * 1e3
    print(f"one decode step's projections ({args.layers} layers × 7): numpy/BLAS {a:.1f} ms, "
          f"onnxruntime {b:.1f} ms, ratio ort/numpy {b / a:.2f}")


if __name__ == "__main__":
    main()
