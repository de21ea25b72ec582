"""Hooks of the schemathesis run in tests/api_contract.rs.

A real client sends a new Idempotency-Key for each intended write. Schemathesis draws keys
from the header's schema and so sends short keys such as "0" again and again, which the server
rightly refuses with 422 idempotency_key_reused before looking at the rest of the request. So a
valid key is replaced by a new random one; an invalid key (a negative test of the header) is
sent as generated.
"""

import re
import uuid

import schemathesis

VALID_KEY = re.compile(r"[!-~]{1,128}")


@schemathesis.hook
def before_call(context, case, kwargs):
    headers = case.headers
    if not headers:
        return
    for name, value in list(headers.items()):
        if name.lower() == "idempotency-key" and isinstance(value, str) and VALID_KEY.fullmatch(value):
            headers[name] = uuid.uuid4().hex
