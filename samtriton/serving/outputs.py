"""Which ensemble outputs a request wants computed.

Triton 2.51's ensemble asks its last step for every output it maps, whatever
the client listed, so the postprocess cannot see the client's choice.  The
request parameter `outputs` (comma-separated output names) carries it; Triton
hands request parameters to every step.  Without it, every output is computed
so that any request gets what it asks for; the SDK always sets it.
"""

from __future__ import annotations

import json

from samtriton import spec
from samtriton.serving.errors import InvalidInput

OUTPUTS_PARAMETER = "outputs"
ALL_OUTPUTS = (spec.SCORES.name, spec.MASKS_RLE.name, spec.MASKS.name)


def requested_outputs(parameters_json: str | None) -> frozenset[str]:
    params = json.loads(parameters_json) if parameters_json else {}
    value = params.get(OUTPUTS_PARAMETER)
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
