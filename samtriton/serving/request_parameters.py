"""The request parameters a `sam` request may carry, parsed the same way by every step.

Triton hands a request's parameters to every step of an ensemble, as JSON.

- `multimask_output` (bool, default false): three candidate masks per prompt
  with their predicted IoU (upstream's multimask output), instead of one.
- `outputs` (comma-separated output names): Triton 2.51's ensemble asks its
  last step for every output it maps, whatever the client listed, so the
  postprocess cannot see the client's choice; this parameter carries it.
  Without it, every output is computed so that any request gets what it asks
  for; the SDK always sets it.
"""

from __future__ import annotations

import json

from samtriton import spec
from samtriton.serving.errors import InvalidInput

OUTPUTS_PARAMETER = "outputs"
MULTIMASK_PARAMETER = "multimask_output"
ALL_OUTPUTS = tuple(t.name for t in spec.ENSEMBLE_OUTPUTS)


def _parameters(parameters_json: str | None) -> dict:
    return json.loads(parameters_json) if parameters_json else {}


def requested_outputs(parameters_json: str | None) -> frozenset[str]:
    value = _parameters(parameters_json).get(OUTPUTS_PARAMETER)
    field = f"parameters.{OUTPUTS_PARAMETER}"
    if value is None:
        return frozenset(ALL_OUTPUTS)
    if not isinstance(value, str):
        raise InvalidInput(field, f"expected a comma-separated string of output names, got {value!r}")
    parts = [v.strip() for v in value.split(",")]
    if not all(parts):
        raise InvalidInput(field, f"{value!r} has an empty name; expected e.g. 'scores,masks_rle'")
    names = set(parts)
    unknown = names - set(ALL_OUTPUTS)
    if unknown:
        raise InvalidInput(field, f"unknown output(s) {sorted(unknown) or value!r}; valid: {', '.join(ALL_OUTPUTS)}")
    return frozenset(names)


def multimask_output(parameters_json: str | None) -> bool:
    value = _parameters(parameters_json).get(MULTIMASK_PARAMETER, False)
    if not isinstance(value, bool):
        raise InvalidInput(f"parameters.{MULTIMASK_PARAMETER}",
                           f"expected a boolean (true for three masks per prompt), got {value!r}")
    return value
