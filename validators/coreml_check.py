#!/usr/bin/env python3
"""Judge Core ML packages written by `ane mil --coreml` with coremltools' own readers.

For each OUT.mlpackage given:
  1. coremltools.models.MLModel(path, skip_model_load=True) loads it (Manifest.json, the Model
     protobuf, the weights folder);
  2. the model is an mlProgram whose `main` has Core ML opset CoreML8 (iOS18) at specification
     version 9 (or what --opset/--spec say);
  3. coremltools' milproto frontend converts the program to its own representation (pymil), which
     rebuilds every non-const op with `mb.<op>` (argument names, dtypes, shape rules), compares
     each declared output type with its own type inference, and reads every BLOBFILE with the
     native MILBlob reader;
  4. pymil's own validation of the program (`Program.validate`: variable visibility, producer and
     consumer links) passes;
  5. the pymil program's `main` inputs and outputs have the names, dtypes and shapes the model
     description declares, and every op the protobuf has is in the pymil program.

Exit status: 0 if every package passes, 1 if any fails (each failure printed), 2 on bad usage.
`--expect-fail` inverts the verdict per package (for the deliberately broken packages of the test).

`--corrupt KIND SRC DST` writes DST, a copy of the package SRC broken in one way only coremltools'
rules catch (the model description is kept consistent with the change), so a test can show that
this judge rejects what it should:
  output-shape  the last op declares an output one row longer than its inputs give;
  input-dtype   `main`'s first input is fp32 (the ops take it with fp16 operands);
  blob-offset   the first BLOBFILE value points 64 bytes past its blob's descriptor.
"""
import argparse
import os
import sys


def check(path, ct, milproto_load, types, opset, spec_version):
    m = ct.models.MLModel(path, skip_model_load=True)
    spec = m.get_spec()
    kind = spec.WhichOneof("Type")
    if kind != "mlProgram":
        raise AssertionError(f"model type {kind}, not mlProgram")
    if spec.specificationVersion != spec_version:
        raise AssertionError(f"specificationVersion {spec.specificationVersion} != {spec_version}")
    funcs = spec.mlProgram.functions
    if "main" not in funcs or funcs["main"].opset != opset:
        raise AssertionError(f"no main function with opset {opset}")
    n_ops = len(funcs["main"].block_specializations[opset].operations)
    prog = milproto_load(spec, specification_version=spec.specificationVersion,
                         file_weights_dir=m.weights_dir)
    prog.validate()
    main = prog.functions["main"]
    desc = spec.description
    dt = {65552: types.fp16, 65568: types.fp32, 131104: types.int32}
    for feat in desc.input:
        var = main.inputs.get(feat.name)
        if var is None:
            raise AssertionError(f"input {feat.name} missing from the pymil program")
        want = (dt[feat.type.multiArrayType.dataType], tuple(feat.type.multiArrayType.shape))
        got = (var.dtype, tuple(var.shape))
        if got != want:
            raise AssertionError(f"input {feat.name}: pymil {got}, description {want}")
    outs = {v.name: v for v in main.outputs}
    if [f.name for f in desc.output] != [v.name for v in main.outputs]:
        raise AssertionError(f"outputs {list(outs)} != description {[f.name for f in desc.output]}")
    for feat in desc.output:
        var = outs[feat.name]
        want = (dt[feat.type.multiArrayType.dataType], tuple(feat.type.multiArrayType.shape))
        got = (var.dtype, tuple(var.shape))
        if got != want:
            raise AssertionError(f"output {feat.name}: inferred {got}, description {want}")
    got_ops = len(main.operations)
    if got_ops != n_ops:
        raise AssertionError(f"pymil has {got_ops} ops, the protobuf {n_ops}")
    shapes = ", ".join(f"{k}{tuple(v.shape)}" for k, v in main.inputs.items())
    return f"{n_ops} ops, inputs {shapes}, outputs " + ", ".join(
        f"{v.name}{tuple(v.shape)}" for v in main.outputs)


def corrupt(kind, src, dst, ct):
    import shutil
    spec = ct.models.MLModel(src, skip_model_load=True).get_spec()
    func = spec.mlProgram.functions["main"]
    ops = func.block_specializations[func.opset].operations
    if kind == "output-shape":
        out = ops[-1].outputs[0]
        dims = out.type.tensorType.dimensions
        dims[len(dims) - 2].constant.size += 1
        for feat in spec.description.output:
            if feat.name == out.name:
                feat.type.multiArrayType.shape[len(dims) - 2] += 1
    elif kind == "input-dtype":
        fp32 = 65568  # ArrayFeatureType.FLOAT32
        func.inputs[0].type.tensorType.dataType = ct.proto.MIL_pb2.FLOAT32
        spec.description.input[0].type.multiArrayType.dataType = fp32
    elif kind == "blob-offset":
        blobs = [a for op in ops for a in op.attributes.values()
                 if a.WhichOneof("value") == "blobFileValue"]
        if not blobs:
            raise SystemExit(f"{src}: no BLOBFILE value to corrupt")
        blobs[0].blobFileValue.offset += 64
    else:
        raise SystemExit(f"unknown corruption {kind}")
    if os.path.exists(dst):
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    with open(os.path.join(dst, "Data", "com.apple.CoreML", "model.mlmodel"), "wb") as f:
        f.write(spec.SerializeToString())


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corrupt", nargs=3, metavar=("KIND", "SRC", "DST"))
    ap.add_argument("packages", nargs="*")
    ap.add_argument("--opset", default="CoreML8")
    ap.add_argument("--spec", type=int, default=9)
    ap.add_argument("--expect-fail", action="store_true")
    a = ap.parse_args()
    import io
    import contextlib
    with contextlib.redirect_stderr(io.StringIO()):
        import coremltools as ct
        from coremltools.converters.mil.frontend.milproto.load import load as milproto_load
        from coremltools.converters.mil.mil import types
    if a.corrupt:
        corrupt(*a.corrupt, ct)
        return 0
    if not a.packages:
        ap.error("no packages given")
    bad = 0
    for p in a.packages:
        if not os.path.isdir(p):
            print(f"FAIL {p}: not a directory")
            bad += 1
            continue
        try:
            summary = check(p, ct, milproto_load, types, a.opset, a.spec)
            ok, msg = True, summary
        except Exception as e:  # noqa: BLE001 - any rejection is the verdict
            ok, msg = False, f"{type(e).__name__}: {e}"
        if ok != a.expect_fail:
            print(f"PASS {p}: {msg}" if ok else f"PASS (rejected as expected) {p}: {msg}")
        else:
            print(f"FAIL {p}: {msg}" if not ok else f"FAIL {p}: accepted but expected a rejection")
            bad += 1
    print(f"{len(a.packages) - bad} passed, {bad} failed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
