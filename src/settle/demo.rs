//! Seeded synthetic input for `settlement demo`, tests and benchmarks: deposits first, then
//! trades between random users, withdrawals (some above the balance, which are refused), and a
//! few malformed messages. Deterministic for a seed.

/// What to generate.
#[derive(Clone, Copy, Debug)]
pub struct DemoSpec {
    /// PRNG seed.
    pub seed: u64,
    /// Number of users.
    pub users: u64,
    /// Number of trades.
    pub trades: u64,
    /// One withdrawal per this many trades (0: none).
    pub withdraw_every: u64,
    /// One malformed message per this many trades (0: none).
    pub malformed_every: u64,
}

impl Default for DemoSpec {
    fn default() -> Self {
        DemoSpec {
            seed: 42,
            users: 100,
            trades: 20_000,
            withdraw_every: 50,
            malformed_every: 1000,
        }
    }
}

const SYMBOLS: [(&str, &str, i64); 3] = [
    ("BTC", "USDT", 65_000),
    ("ETH", "USDT", 3_000),
    ("ETH", "BTC", 5),
];

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The messages, one JSON object per line, in output-sequence order.
pub fn generate(spec: &DemoSpec) -> Vec<String> {
    let mut rng = Rng(spec.seed.max(1));
    let mut seq = 0u64;
    let mut out = Vec::new();
    let mut next_seq = || {
        seq += 1;
        seq
    };
    for user in 1..=spec.users {
        for (asset, amount) in [
            ("USDT", 10_000_000_000i64),
            ("BTC", 1_000_000),
            ("ETH", 10_000_000),
        ] {
            out.push(format!(
                r#"{{"output_sequence":{},"type":"deposit","user_id":{user},"asset":"{asset}","amount":{amount}}}"#,
                next_seq()
            ));
        }
    }
    for i in 1..=spec.trades {
        let (base, quote, price) = SYMBOLS[rng.below(SYMBOLS.len() as u64) as usize];
        let buyer = 1 + rng.below(spec.users);
        // Now and then a user trades with themself (net zero).
        let seller = if rng.below(500) == 0 {
            buyer
        } else {
            1 + rng.below(spec.users)
        };
        let quantity = 1 + rng.below(20);
        let price = price + rng.below(100) as i64;
        out.push(format!(
            r#"{{"output_sequence":{},"trade_id":{},"symbol":"{base}-{quote}","buyer_user_id":{buyer},"seller_user_id":{seller},"price":{price},"quantity":{quantity},"timestamp_ns":{}}}"#,
            next_seq(),
            1_000_000 + i,
            1_763_900_000_000_000_000u64 + i * 1000
        ));
        if spec.withdraw_every > 0 && i % spec.withdraw_every == 0 {
            let user = 1 + rng.below(spec.users);
            // Sometimes far more than anyone holds: refused with a reason.
            let amount = if rng.below(4) == 0 {
                1_000_000_000_000
            } else {
                1 + rng.below(1000)
            };
            out.push(format!(
                r#"{{"output_sequence":{},"type":"withdraw","user_id":{user},"asset":"USDT","amount":{amount}}}"#,
                next_seq()
            ));
        }
        if spec.malformed_every > 0 && i % spec.malformed_every == 0 {
            out.push(format!(
                r#"{{"output_sequence":{},"trade_id":{},"symbol":"BTCUSDT","buyer_user_id":1,"seller_user_id":2,"price":-1,"quantity":1,"timestamp_ns":0}}"#,
                next_seq(),
                9_000_000 + i
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settle::event::parse_event;

    #[test]
    fn generation_is_deterministic_and_parses() {
        let spec = DemoSpec {
            trades: 2500,
            ..DemoSpec::default()
        };
        let a = generate(&spec);
        assert_eq!(a, generate(&spec));
        let ok = a
            .iter()
            .filter(|l| parse_event(l.as_bytes()).is_ok())
            .count();
        assert!(ok > 2500 && ok < a.len());
    }
}
