//! The event model of the interface contract, and validation of incoming messages.
//!
//! One JSON object per message. Without `type` it is a trade; `type` is `deposit` or `withdraw`.
//! All amounts are integers in minor units. Unknown fields are ignored; everything else that is
//! wrong becomes a [`Rejection`] with a reason naming the field.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::ledger::{Amount, MovementKind, UserId, MAX_ASSET_LEN_BYTES};

/// Longest message accepted, in bytes; anything longer is rejected unparsed.
pub const MAX_MESSAGE_BYTES: usize = 4096;

/// A validated trade.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trade {
    /// Engine output sequence.
    pub output_sequence: u64,
    /// Engine trade id.
    pub trade_id: u64,
    /// Base asset (`BTC` of `BTC-USDT`).
    pub base: String,
    /// Quote asset (`USDT` of `BTC-USDT`).
    pub quote: String,
    /// Buyer.
    pub buyer_user_id: UserId,
    /// Seller.
    pub seller_user_id: UserId,
    /// Price, quote minor units per base unit, > 0.
    pub price: Amount,
    /// Quantity, base minor units, > 0.
    pub quantity: Amount,
    /// Engine timestamp.
    pub timestamp_ns: i64,
}

impl Trade {
    /// `BASE-QUOTE`.
    pub fn symbol(&self) -> String {
        format!("{}-{}", self.base, self.quote)
    }

    /// `price * quantity`, checked at validation time.
    pub fn notional(&self) -> Amount {
        self.price
            .checked_mul(self.quantity)
            .expect("notional was checked when the trade was validated")
    }
}

/// A validated deposit or withdrawal.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Movement {
    /// Engine output sequence.
    pub output_sequence: u64,
    /// Deposit or withdrawal.
    pub kind: MovementKind,
    /// Whose balance.
    pub user_id: UserId,
    /// Which asset.
    pub asset: String,
    /// How much, > 0.
    pub amount: Amount,
}

/// A validated event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Event {
    /// A trade.
    Trade(Trade),
    /// A deposit or withdrawal.
    Movement(Movement),
}

impl Event {
    /// The engine's output sequence.
    pub fn output_sequence(&self) -> u64 {
        match self {
            Event::Trade(t) => t.output_sequence,
            Event::Movement(m) => m.output_sequence,
        }
    }
}

/// Why a message was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    /// The message's output sequence, when it had a readable one.
    pub output_sequence: Option<u64>,
    /// What was wrong, naming the field.
    pub reason: String,
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.output_sequence {
            Some(s) => write!(f, "output_sequence {s}: {}", self.reason),
            None => f.write_str(&self.reason),
        }
    }
}

fn field<'a>(obj: &'a Map<String, Value>, name: &str) -> Result<&'a Value, String> {
    obj.get(name)
        .ok_or_else(|| format!("missing field {name:?}"))
}

/// Ids and sequences must fit a signed 64-bit integer: Cassandra stores them as `bigint`, and an
/// id no store can hold must be rejected here, not wedge the pipeline at write time.
fn u64_field(obj: &Map<String, Value>, name: &str) -> Result<u64, String> {
    let v = field(obj, name)?;
    match v.as_u64() {
        Some(n) if n <= i64::MAX as u64 => Ok(n),
        Some(n) => Err(format!(
            "field {name:?} is too large: {n} (at most {})",
            i64::MAX
        )),
        None => Err(format!(
            "field {name:?} must be a non-negative integer, got {v}"
        )),
    }
}

fn positive_amount(obj: &Map<String, Value>, name: &str) -> Result<Amount, String> {
    let v = field(obj, name)?;
    match v.as_i64() {
        Some(n) if n > 0 => Ok(n),
        Some(n) => Err(format!("field {name:?} must be positive, got {n}")),
        None if v.is_u64() => Err(format!("field {name:?} is too large: {v}")),
        None => Err(format!(
            "field {name:?} must be an integer in minor units, got {v}"
        )),
    }
}

fn asset_name(s: &str, what: &str) -> Result<String, String> {
    if s.is_empty()
        || s.len() > MAX_ASSET_LEN_BYTES
        || !s
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
    {
        return Err(format!(
            "{what} {s:?} must be 1 to {MAX_ASSET_LEN_BYTES} upper-case letters or digits"
        ));
    }
    Ok(s.to_string())
}

/// Parses and validates one message (a JSON line or a ZeroMQ frame).
pub fn parse_event(message: &[u8]) -> Result<Event, Rejection> {
    let reject = |output_sequence, reason: String| Rejection {
        output_sequence,
        reason,
    };
    if message.len() > MAX_MESSAGE_BYTES {
        return Err(reject(
            None,
            format!(
                "message of {} bytes exceeds {MAX_MESSAGE_BYTES}",
                message.len()
            ),
        ));
    }
    let value: Value = serde_json::from_slice(message)
        .map_err(|e| reject(None, format!("not valid JSON: {e}")))?;
    let Value::Object(obj) = value else {
        return Err(reject(None, "message is not a JSON object".into()));
    };
    let seq = u64_field(&obj, "output_sequence").map_err(|e| reject(None, e))?;
    let with_seq = |e: String| reject(Some(seq), e);
    match obj.get("type") {
        None => parse_trade(&obj, seq).map_err(with_seq),
        Some(Value::String(t)) => match MovementKind::from_name(t) {
            Some(kind) => parse_movement(&obj, seq, kind).map_err(with_seq),
            None => Err(with_seq(format!(
                "unknown type {t:?} (expected \"deposit\" or \"withdraw\", or no type for a trade)"
            ))),
        },
        Some(other) => Err(with_seq(format!(
            "field \"type\" must be a string, got {other}"
        ))),
    }
}

fn parse_trade(obj: &Map<String, Value>, seq: u64) -> Result<Event, String> {
    let trade_id = u64_field(obj, "trade_id")?;
    let symbol = field(obj, "symbol")?
        .as_str()
        .ok_or_else(|| "field \"symbol\" must be a string".to_string())?;
    let Some((base, quote)) = symbol.split_once('-') else {
        return Err(format!("symbol {symbol:?} must be BASE-QUOTE"));
    };
    let base = asset_name(base, "base asset")?;
    let quote = asset_name(quote, "quote asset")?;
    if base == quote {
        return Err(format!(
            "symbol {symbol:?} has the same base and quote asset"
        ));
    }
    let buyer_user_id = u64_field(obj, "buyer_user_id")?;
    let seller_user_id = u64_field(obj, "seller_user_id")?;
    let price = positive_amount(obj, "price")?;
    let quantity = positive_amount(obj, "quantity")?;
    if price.checked_mul(quantity).is_none() {
        return Err(format!(
            "price * quantity overflows 64-bit minor units ({price} * {quantity})"
        ));
    }
    let ts = field(obj, "timestamp_ns")?;
    let timestamp_ns = ts.as_i64().filter(|t| *t >= 0).ok_or_else(|| {
        format!("field \"timestamp_ns\" must be a non-negative 64-bit integer, got {ts}")
    })?;
    Ok(Event::Trade(Trade {
        output_sequence: seq,
        trade_id,
        base,
        quote,
        buyer_user_id,
        seller_user_id,
        price,
        quantity,
        timestamp_ns,
    }))
}

fn parse_movement(obj: &Map<String, Value>, seq: u64, kind: MovementKind) -> Result<Event, String> {
    let user_id = u64_field(obj, "user_id")?;
    let asset = field(obj, "asset")?
        .as_str()
        .ok_or_else(|| "field \"asset\" must be a string".to_string())?;
    let asset = asset_name(asset, "asset")?;
    let amount = positive_amount(obj, "amount")?;
    Ok(Event::Movement(Movement {
        output_sequence: seq,
        kind,
        user_id,
        asset,
        amount,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reason(msg: &str) -> String {
        parse_event(msg.as_bytes()).unwrap_err().reason
    }

    #[test]
    fn parses_the_contract_examples() {
        let t = parse_event(br#"{"output_sequence": 17, "trade_id": 9001, "symbol": "BTC-USDT", "buyer_user_id": 1,
 "seller_user_id": 2, "price": 65000, "quantity": 3, "timestamp_ns": 1763900000000000000, "extra": true}"#)
        .unwrap();
        let Event::Trade(t) = t else { panic!() };
        assert_eq!(
            (t.base.as_str(), t.quote.as_str(), t.notional()),
            ("BTC", "USDT", 195_000)
        );
        let d = parse_event(br#"{"output_sequence": 18, "type": "deposit",  "user_id": 1, "asset": "USDT", "amount": 1000000}"#).unwrap();
        assert_eq!(d.output_sequence(), 18);
        let w = parse_event(br#"{"output_sequence": 19, "type": "withdraw", "user_id": 1, "asset": "USDT", "amount": 500}"#).unwrap();
        assert!(matches!(
            w,
            Event::Movement(Movement {
                kind: MovementKind::Withdraw,
                amount: 500,
                ..
            })
        ));
    }

    #[test]
    fn rejections_name_what_was_wrong() {
        assert!(reason("not json").contains("not valid JSON"));
        assert!(reason("[1]").contains("not a JSON object"));
        assert!(reason(r#"{"trade_id": 1}"#).contains("output_sequence"));
        assert!(reason(r#"{"output_sequence": -1}"#).contains("non-negative"));
        assert!(reason(r#"{"output_sequence": 9223372036854775808}"#).contains("too large"));
        assert!(reason(r#"{"output_sequence": 1, "type": "deposit", "user_id": 18446744073709551615, "asset": "BTC", "amount": 1}"#).contains("too large"));
        let base = r#""output_sequence": 1, "trade_id": 5, "buyer_user_id": 1, "seller_user_id": 2, "timestamp_ns": 1"#;
        assert!(reason(&format!(
            "{{{base}, \"symbol\": \"BTCUSDT\", \"price\": 1, \"quantity\": 1}}"
        ))
        .contains("BASE-QUOTE"));
        assert!(reason(&format!(
            "{{{base}, \"symbol\": \"BTC-BTC\", \"price\": 1, \"quantity\": 1}}"
        ))
        .contains("same base"));
        assert!(reason(&format!(
            "{{{base}, \"symbol\": \"btc-USDT\", \"price\": 1, \"quantity\": 1}}"
        ))
        .contains("upper-case"));
        assert!(reason(&format!(
            "{{{base}, \"symbol\": \"BTC-USDT\", \"price\": 0, \"quantity\": 1}}"
        ))
        .contains("positive"));
        assert!(reason(&format!(
            "{{{base}, \"symbol\": \"BTC-USDT\", \"price\": 1.5, \"quantity\": 1}}"
        ))
        .contains("integer"));
        assert!(reason(&format!(
            "{{{base}, \"symbol\": \"BTC-USDT\", \"price\": \"1\", \"quantity\": 1}}"
        ))
        .contains("integer"));
        assert!(reason(&format!(
            "{{{base}, \"symbol\": \"BTC-USDT\", \"price\": 4294967296, \"quantity\": 4294967296}}"
        ))
        .contains("overflows"));
        assert!(reason(r#"{"output_sequence": 2, "type": "bonus"}"#).contains("unknown type"));
        assert!(reason(r#"{"output_sequence": 2, "type": "deposit", "user_id": 1, "asset": "USDT", "amount": -5}"#).contains("positive"));
        assert!(
            reason(r#"{"output_sequence": 2, "type": "deposit", "user_id": 1, "amount": 5}"#)
                .contains("missing field \"asset\"")
        );
        let long = "x".repeat(MAX_MESSAGE_BYTES + 1);
        assert!(reason(&long).contains("exceeds"));
    }
}
