//! Seeded mutations, for the tests that hold the gateway to what an independent reader makes of random input.

/// xorshift64*: deterministic, so a failing case is replayed from the seed it prints.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }

    /// A number below `n` (0 for an `n` of 0).
    pub fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 33) as usize % n.max(1)
    }
}

/// How many cases and from which seed: `PORTCULLIS_FUZZ_CASES` and `PORTCULLIS_FUZZ_SEED`, else the defaults.
pub fn fuzz_settings(cases: usize, seed: u64) -> (usize, u64) {
    let env = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok());
    (env("PORTCULLIS_FUZZ_CASES").map_or(cases, |c| c as usize), env("PORTCULLIS_FUZZ_SEED").unwrap_or(seed))
}

/// HTTP/1 framing syntax, and bytes no field may hold: what every mutation may write.
const SYNTAX: [&[u8]; 15] = [b"\r\n", b"\n", b"\r", b" ", b"\t", b":", b",", b";", b"0", b"9", b"f", b"+", b"\0", b"\x7f", b"\xc3\xa9"];

/// `seed` with 1 to `most` random edits: a piece of framing syntax or of `extra` written over it or into it, a
/// byte replaced by one, a few bytes dropped or repeated, or the tail cut (never below `keep` bytes).
pub fn mutate(rng: &mut Rng, seed: &[u8], extra: &[&[u8]], most: usize, keep: usize) -> Vec<u8> {
    let mut bytes = seed.to_vec();
    for _ in 0..1 + rng.below(most) {
        let at = rng.below(bytes.len() + 1);
        let k = rng.below(SYNTAX.len() + extra.len());
        let piece = if k < SYNTAX.len() { SYNTAX[k] } else { extra[k - SYNTAX.len()] };
        match rng.below(6) {
            0 => bytes.splice(at..(at + piece.len()).min(bytes.len()), piece.iter().copied()).for_each(drop),
            1 => bytes.splice(at..at, piece.iter().copied()).for_each(drop),
            2 => bytes.splice(at..(at + 1).min(bytes.len()), piece.iter().copied()).for_each(drop),
            3 => bytes.drain(at..(at + 1 + rng.below(4)).min(bytes.len())).for_each(drop),
            4 => {
                let end = (at + 1 + rng.below(12)).min(bytes.len());
                let copy = bytes[at..end].to_vec();
                bytes.splice(at..at, copy).for_each(drop);
            }
            _ => bytes.truncate(at.max(keep)),
        }
    }
    bytes
}
