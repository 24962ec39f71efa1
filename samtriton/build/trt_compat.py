"""Static checks that an exported ONNX graph is one TensorRT's ONNX parser takes.

They run without TensorRT (this project's CI has none) and catch what breaks
SAM decoder exports in practice: operators TensorRT lacks or handles only on
the host (OneHot, NonZero, loops), in-place scatter writes, and shape tensors
computed from prompt *values* (upstream decoders derive a Tile count from point
labels through OneHot, which TensorRT 10 refuses: "IIOneHotLayer cannot be used
to compute a shape tensor").  A value may reach a shape only through `Shape`.
"""

from __future__ import annotations

import onnx

from samtriton import spec

# ONNX operators the graphs may contain; all are TensorRT 10 layers.
SUPPORTED_OPS = frozenset({
    "Add", "Cast", "Clip", "Concat", "Constant", "ConstantOfShape", "Conv", "ConvTranspose", "Cos", "Div",
    "Equal", "Erf", "Expand", "Flatten", "Gather", "Gemm", "Greater", "GreaterOrEqual", "HardSigmoid",
    "HardSwish", "Identity", "LayerNormalization", "Less", "LessOrEqual", "MatMul", "Max", "Min", "Mul",
    "Neg", "Not", "Pad", "Pow", "Range", "Reciprocal", "ReduceMax", "ReduceMean", "ReduceSum", "Relu",
    "Reshape", "Resize", "Shape", "Sigmoid", "Sin", "Slice", "Softmax", "Split", "Sqrt", "Squeeze", "Sub",
    "Tanh", "Transpose", "Unsqueeze", "Where", "BatchNormalization", "AveragePool", "MaxPool",
    "GlobalAveragePool", "Tile",
    # SAM ViT-B: window padding arithmetic on static shapes, and the two-input
    # relative-position einsums (no ellipsis), both in TensorRT's parser.
    "Mod", "Einsum",
})
# Operators TensorRT rejects or cannot use for shapes; named in the message.
KNOWN_BAD = {
    "OneHot": "OneHot cannot compute shape tensors in TensorRT",
    "NonZero": "NonZero gives a data-dependent shape",
    "Loop": "loops are not supported by the engine builder here",
    "If": "data-dependent control flow",
    "Scan": "loops are not supported by the engine builder here",
    "ScatterND": "in-place slice writes (export them as concatenations)",
    "Unique": "data-dependent shape",
}
# For each operator, which inputs TensorRT needs as shape tensors.
SHAPE_INPUTS = {
    "Reshape": (1,), "Expand": (1,), "Tile": (1,), "ConstantOfShape": (0,), "Range": (0, 1, 2),
    "Slice": (1, 2, 3, 4), "Resize": (1, 2, 3), "Pad": (1,), "Unsqueeze": (1,), "Squeeze": (1,),
    "Split": (1,), "ReduceSum": (1,), "ReduceMean": (1,), "ReduceMax": (1,),
}


# The GPU decoder graph's inputs whose values come from requests (prompts,
# masks, the running counts of the ragged batch): none may shape anything.
DECODER_VALUE_INPUTS = (spec.PROMPT_COORDS_NAME, spec.PROMPT_LABELS_NAME, spec.MODEL_MASK_INPUTS_NAME,
                        spec.HAS_MASK_INPUT_NAME, spec.LABELS_ACCUMULATED_NAME, spec.MASKS_ACCUMULATED_NAME)


def problems(model: onnx.ModelProto, value_inputs: tuple[str, ...]) -> list[str]:
    """What TensorRT would refuse in `model`; `value_inputs` are the graph inputs
    whose values come from requests (prompts, counts), which must not shape anything."""
    found = []
    tainted = set(value_inputs)
    for node in model.graph.node:  # ONNX graphs are stored in topological order
        if node.op_type in KNOWN_BAD:
            found.append(f"{node.name or node.op_type}: {KNOWN_BAD[node.op_type]}")
        elif node.op_type not in SUPPORTED_OPS:
            found.append(f"{node.name or node.op_type}: operator {node.op_type} is not on the supported list")
        for i in SHAPE_INPUTS.get(node.op_type, ()):
            if i < len(node.input) and node.input[i] in tainted:
                found.append(f"{node.name or node.op_type}: its shape input {node.input[i]!r} is computed "
                             f"from the values of {', '.join(value_inputs)}")
        # Shape() reads only a tensor's dimensions: what it produces is not tainted.
        if node.op_type != "Shape" and any(x in tainted for x in node.input):
            tainted.update(node.output)
    for tensor in (*model.graph.input, *model.graph.output):
        elem = tensor.type.tensor_type.elem_type
        if elem not in (onnx.TensorProto.FLOAT, onnx.TensorProto.INT32):
            found.append(f"graph tensor {tensor.name} has type {onnx.TensorProto.DataType.Name(elem)}; "
                         "the Triton configs declare FP32 / INT32")
    return found
