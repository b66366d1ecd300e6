#!/usr/bin/env python3
"""Mint N distinct valid bench tokens (iss "bench", roles ["user","admin"], exp in 2 h, a unique sub and jti)
for benches/cache_miss.sh: mint_tokens.py ALG KEYFILE N OUT, using both cores.

Needs PyJWT and cryptography, which live outside this repository: cache_miss.sh runs it with the venv that
../shared/bench/setup.sh makes under $BENCH_STATE (~/.cache/portcullis-bench/.venv)."""
import sys, time, uuid
from multiprocessing import Pool

try:
    import jwt
    from cryptography.hazmat.primitives.serialization import load_pem_private_key
except ImportError as e:
    sys.exit(f"mint_tokens.py needs PyJWT and cryptography ({e}): run it with the venv ../shared/bench/setup.sh makes")

ALG, KEYFILE, N, OUT = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]


def key():
    data = open(KEYFILE, "rb").read()
    return data if ALG == "HS256" else load_pem_private_key(data, None)


def mint(span):
    k, now, out = key(), int(time.time()), []
    for i in range(*span):
        claims = {"sub": f"user-{i}", "iss": "bench", "iat": now, "exp": now + 7200,
                  "roles": ["user", "admin"], "jti": uuid.uuid4().hex}
        out.append(jwt.encode(claims, k, algorithm=ALG))
    return out


if __name__ == "__main__":
    half = N // 2
    with Pool(2) as p, open(OUT, "w") as f:
        for part in p.map(mint, [(0, half), (half, N)]):
            f.write("\n".join(part) + "\n")
