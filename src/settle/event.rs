//! The event model of the interface contract, and validation of incoming messages.
//!
//! One JSON object per message. Without `type` it is a trade; `type` is `deposit` or `withdraw`.
//! All amounts are integers in minor units. Unknown fields are ignored; everything else that is
//! wrong becomes a [`Rejection`] with a reason naming the field.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::ledger::{Amount, Asset, MovementKind, Symbol, UserId, MAX_ASSET_LEN_BYTES};

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
    pub base: Asset,
    /// Quote asset (`USDT` of `BTC-USDT`).
    pub quote: Asset,
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
    pub fn symbol(&self) -> Symbol {
        // Not `format!`, no allocation: this runs for every trade row.
        Symbol::joined(&self.base, '-', &self.quote)
            .expect("two asset names and a dash fit MAX_SYMBOL_LEN_BYTES")
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
    pub asset: Asset,
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

/// One field value of a message, as read from the JSON without building a tree: numbers and
/// strings are kept as they are (strings borrowed from the message when they have no escapes);
/// anything else is kept as a [`Value`] only to name it in a rejection.
#[derive(Debug)]
enum Scalar<'a> {
    U64(u64),
    I64(i64),
    F64(f64),
    Str(std::borrow::Cow<'a, str>),
    Other(Value),
}

impl Scalar<'_> {
    fn as_u64(&self) -> Option<u64> {
        match *self {
            Scalar::U64(n) => Some(n),
            _ => None,
        }
    }

    /// Like [`Value::as_i64`]: any integer that fits an `i64`.
    fn as_i64(&self) -> Option<i64> {
        match *self {
            Scalar::U64(n) => i64::try_from(n).ok(),
            Scalar::I64(n) => Some(n),
            _ => None,
        }
    }

    fn as_str(&self) -> Option<&str> {
        match self {
            Scalar::Str(s) => Some(s),
            _ => None,
        }
    }
}

/// Shown in rejections exactly as JSON (`"12"`, `1.5`, `null`, `[1]`).
impl std::fmt::Display for Scalar<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Scalar::U64(n) => write!(f, "{n}"),
            Scalar::I64(n) => write!(f, "{n}"),
            Scalar::F64(x) => write!(f, "{}", Value::from(*x)),
            Scalar::Str(s) => write!(f, "{}", Value::from(s.as_ref())),
            Scalar::Other(v) => write!(f, "{v}"),
        }
    }
}

impl<'de> serde::Deserialize<'de> for Scalar<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Scalar<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_u64<E>(self, n: u64) -> Result<Scalar<'de>, E> {
                Ok(Scalar::U64(n))
            }
            fn visit_i64<E>(self, n: i64) -> Result<Scalar<'de>, E> {
                Ok(match u64::try_from(n) {
                    Ok(u) => Scalar::U64(u),
                    Err(_) => Scalar::I64(n),
                })
            }
            fn visit_f64<E>(self, x: f64) -> Result<Scalar<'de>, E> {
                Ok(Scalar::F64(x))
            }
            fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Scalar<'de>, E> {
                Ok(Scalar::Str(std::borrow::Cow::Borrowed(s)))
            }
            fn visit_str<E>(self, s: &str) -> Result<Scalar<'de>, E> {
                Ok(Scalar::Str(std::borrow::Cow::Owned(s.to_string())))
            }
            fn visit_string<E>(self, s: String) -> Result<Scalar<'de>, E> {
                Ok(Scalar::Str(std::borrow::Cow::Owned(s)))
            }
            fn visit_bool<E>(self, b: bool) -> Result<Scalar<'de>, E> {
                Ok(Scalar::Other(Value::Bool(b)))
            }
            fn visit_unit<E>(self) -> Result<Scalar<'de>, E> {
                Ok(Scalar::Other(Value::Null))
            }
            fn visit_none<E>(self) -> Result<Scalar<'de>, E> {
                Ok(Scalar::Other(Value::Null))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                a: A,
            ) -> Result<Scalar<'de>, A::Error> {
                let d = serde::de::value::SeqAccessDeserializer::new(a);
                Ok(Scalar::Other(Value::deserialize(d)?))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                a: A,
            ) -> Result<Scalar<'de>, A::Error> {
                let d = serde::de::value::MapAccessDeserializer::new(a);
                Ok(Scalar::Other(Value::deserialize(d)?))
            }
        }
        d.deserialize_any(V)
    }
}

/// The fields of the contract a message may carry; every other key is ignored.
#[derive(Clone, Copy)]
enum Key {
    OutputSequence,
    Type,
    TradeId,
    Symbol,
    BuyerUserId,
    SellerUserId,
    Price,
    Quantity,
    TimestampNs,
    UserId,
    Asset,
    Amount,
    Unknown,
}

impl<'de> serde::Deserialize<'de> for Key {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Key;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a field name")
            }
            fn visit_str<E>(self, s: &str) -> Result<Key, E> {
                Ok(match s {
                    "output_sequence" => Key::OutputSequence,
                    "type" => Key::Type,
                    "trade_id" => Key::TradeId,
                    "symbol" => Key::Symbol,
                    "buyer_user_id" => Key::BuyerUserId,
                    "seller_user_id" => Key::SellerUserId,
                    "price" => Key::Price,
                    "quantity" => Key::Quantity,
                    "timestamp_ns" => Key::TimestampNs,
                    "user_id" => Key::UserId,
                    "asset" => Key::Asset,
                    "amount" => Key::Amount,
                    _ => Key::Unknown,
                })
            }
        }
        d.deserialize_str(V)
    }
}

/// A message read in one pass: the contract's fields (the last occurrence of a repeated key
/// wins, as with any JSON object reader), or `None` when the JSON is not an object.
#[derive(Default)]
struct Fields<'a> {
    output_sequence: Option<Scalar<'a>>,
    kind: Option<Scalar<'a>>,
    trade_id: Option<Scalar<'a>>,
    symbol: Option<Scalar<'a>>,
    buyer_user_id: Option<Scalar<'a>>,
    seller_user_id: Option<Scalar<'a>>,
    price: Option<Scalar<'a>>,
    quantity: Option<Scalar<'a>>,
    timestamp_ns: Option<Scalar<'a>>,
    user_id: Option<Scalar<'a>>,
    asset: Option<Scalar<'a>>,
    amount: Option<Scalar<'a>>,
}

struct Message<'a>(Option<Fields<'a>>);

impl<'de> serde::Deserialize<'de> for Message<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::{IgnoredAny, MapAccess, SeqAccess, Visitor};
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Message<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<Message<'de>, A::Error> {
                let mut m = Fields::default();
                while let Some(key) = a.next_key::<Key>()? {
                    let slot = match key {
                        Key::OutputSequence => &mut m.output_sequence,
                        Key::Type => &mut m.kind,
                        Key::TradeId => &mut m.trade_id,
                        Key::Symbol => &mut m.symbol,
                        Key::BuyerUserId => &mut m.buyer_user_id,
                        Key::SellerUserId => &mut m.seller_user_id,
                        Key::Price => &mut m.price,
                        Key::Quantity => &mut m.quantity,
                        Key::TimestampNs => &mut m.timestamp_ns,
                        Key::UserId => &mut m.user_id,
                        Key::Asset => &mut m.asset,
                        Key::Amount => &mut m.amount,
                        Key::Unknown => {
                            a.next_value::<IgnoredAny>()?;
                            continue;
                        }
                    };
                    *slot = Some(a.next_value()?);
                }
                Ok(Message(Some(m)))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<Message<'de>, A::Error> {
                while a.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Message(None))
            }
            fn visit_u64<E>(self, _: u64) -> Result<Message<'de>, E> {
                Ok(Message(None))
            }
            fn visit_i64<E>(self, _: i64) -> Result<Message<'de>, E> {
                Ok(Message(None))
            }
            fn visit_f64<E>(self, _: f64) -> Result<Message<'de>, E> {
                Ok(Message(None))
            }
            fn visit_str<E>(self, _: &str) -> Result<Message<'de>, E> {
                Ok(Message(None))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Message<'de>, E> {
                Ok(Message(None))
            }
            fn visit_unit<E>(self) -> Result<Message<'de>, E> {
                Ok(Message(None))
            }
        }
        d.deserialize_any(V)
    }
}

fn field<'s, 'a>(v: &'s Option<Scalar<'a>>, name: &str) -> Result<&'s Scalar<'a>, String> {
    v.as_ref().ok_or_else(|| format!("missing field {name:?}"))
}

/// Ids and sequences must fit a signed 64-bit integer: Cassandra stores them as `bigint`, and an
/// id no store can hold must be rejected here, not wedge the pipeline at write time.
fn u64_field(v: &Option<Scalar>, name: &str) -> Result<u64, String> {
    let v = field(v, name)?;
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

fn positive_amount(v: &Option<Scalar>, name: &str) -> Result<Amount, String> {
    let v = field(v, name)?;
    match v.as_i64() {
        Some(n) if n > 0 => Ok(n),
        Some(n) => Err(format!("field {name:?} must be positive, got {n}")),
        None if matches!(v, Scalar::U64(_)) => Err(format!("field {name:?} is too large: {v}")),
        None => Err(format!(
            "field {name:?} must be an integer in minor units, got {v}"
        )),
    }
}

fn asset_name(s: &str, what: &str) -> Result<Asset, String> {
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
    Ok(Asset::new(s).expect("checked to be at most MAX_ASSET_LEN_BYTES"))
}

/// Parses and validates one message (a JSON line or a ZeroMQ frame).
///
/// One pass over the bytes, no JSON tree: only the contract's fields are kept (unknown fields
/// are skipped, a repeated field's last value counts).
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
    let Message(fields) = serde_json::from_slice(message)
        .map_err(|e| reject(None, format!("not valid JSON: {e}")))?;
    let Some(m) = fields else {
        return Err(reject(None, "message is not a JSON object".into()));
    };
    let seq = u64_field(&m.output_sequence, "output_sequence").map_err(|e| reject(None, e))?;
    let with_seq = |e: String| reject(Some(seq), e);
    match &m.kind {
        None => parse_trade(&m, seq).map_err(with_seq),
        Some(Scalar::Str(t)) => match MovementKind::from_name(t) {
            Some(kind) => parse_movement(&m, seq, kind).map_err(with_seq),
            None => Err(with_seq(format!(
                "unknown type {t:?} (expected \"deposit\" or \"withdraw\", or no type for a trade)"
            ))),
        },
        Some(other) => Err(with_seq(format!(
            "field \"type\" must be a string, got {other}"
        ))),
    }
}

fn parse_trade(m: &Fields, seq: u64) -> Result<Event, String> {
    let trade_id = u64_field(&m.trade_id, "trade_id")?;
    let symbol = field(&m.symbol, "symbol")?
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
    let buyer_user_id = u64_field(&m.buyer_user_id, "buyer_user_id")?;
    let seller_user_id = u64_field(&m.seller_user_id, "seller_user_id")?;
    let price = positive_amount(&m.price, "price")?;
    let quantity = positive_amount(&m.quantity, "quantity")?;
    if price.checked_mul(quantity).is_none() {
        return Err(format!(
            "price * quantity overflows 64-bit minor units ({price} * {quantity})"
        ));
    }
    let ts = field(&m.timestamp_ns, "timestamp_ns")?;
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

fn parse_movement(m: &Fields, seq: u64, kind: MovementKind) -> Result<Event, String> {
    let user_id = u64_field(&m.user_id, "user_id")?;
    let asset = field(&m.asset, "asset")?
        .as_str()
        .ok_or_else(|| "field \"asset\" must be a string".to_string())?;
    let asset = asset_name(asset, "asset")?;
    let amount = positive_amount(&m.amount, "amount")?;
    Ok(Event::Movement(Movement {
        output_sequence: seq,
        kind,
        user_id,
        asset,
        amount,
    }))
}

/// The first, tree-based parser: the property test below checks that the one-pass parser
/// accepts and rejects exactly the same messages, with the same reasons.
#[cfg(test)]
mod reference {
    use serde_json::{Map, Value};

    use super::*;

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

    fn asset_name(s: &str, what: &str) -> Result<Asset, String> {
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
        Ok(Asset::new(s).expect("checked length"))
    }

    /// The first implementation (a `serde_json::Value` tree), kept as the oracle.
    pub fn parse_event_reference(message: &[u8]) -> Result<Event, Rejection> {
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

    fn parse_movement(
        obj: &Map<String, Value>,
        seq: u64,
        kind: MovementKind,
    ) -> Result<Event, String> {
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

    /// One field value of many kinds, valid and not.
    fn any_value() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        prop_oneof![
            (0u64..20).prop_map(|n| n.to_string()),
            any::<u64>().prop_map(|n| n.to_string()),
            any::<i64>().prop_map(|n| n.to_string()),
            Just("9223372036854775808".to_string()),
            Just("18446744073709551616".to_string()),
            Just("-0".to_string()),
            Just("1.5".to_string()),
            Just("1e3".to_string()),
            Just("2.0".to_string()),
            Just("null".to_string()),
            Just("true".to_string()),
            Just("[1,\"a\"]".to_string()),
            Just("{\"a\":{}}".to_string()),
            Just("\"deposit\"".to_string()),
            Just("\"withdraw\"".to_string()),
            Just("\"bonus\"".to_string()),
            Just("\"BTC-USDT\"".to_string()),
            Just("\"ETH-BTC\"".to_string()),
            Just("\"BTC-BTC\"".to_string()),
            Just("\"btc-USDT\"".to_string()),
            Just("\"BTCUSDT\"".to_string()),
            Just("\"B\\u0054C-USDT\"".to_string()),
            Just("\"USDT\"".to_string()),
            Just("\"\"".to_string()),
            Just("\"12\"".to_string()),
            "[A-Z0-9-]{0,12}".prop_map(|s| format!("{s:?}")),
        ]
    }

    /// Malformed JSON is compared by where it is malformed, not by serde_json's wording: the
    /// tree parser and the one-pass reader reach the same bad byte through different serde_json
    /// paths, which can word it differently (`{"extra":-` is "EOF while parsing a value" for a
    /// `Value` and "invalid number" for an ignored field; both at column 140 of that message).
    fn json_position_only(r: Result<Event, Rejection>) -> Result<Event, Rejection> {
        r.map_err(|mut rej| {
            if let Some(rest) = rej.reason.strip_prefix("not valid JSON: ") {
                if let Some(at) = rest.rfind(" at line ") {
                    rej.reason = format!("not valid JSON:{}", &rest[at..]);
                }
            }
            rej
        })
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(4000))]

        /// The one-pass parser and the tree-based reference agree on every message: the same
        /// event, or the same rejection with the same reason.
        #[test]
        fn one_pass_parser_agrees_with_the_tree_parser(
            fields in proptest::collection::vec(
                (proptest::sample::select(vec![
                    "output_sequence", "type", "trade_id", "symbol", "buyer_user_id",
                    "seller_user_id", "price", "quantity", "timestamp_ns", "user_id", "asset",
                    "amount", "extra", "Type",
                ]), any_value()),
                0..14,
            ),
            cut in proptest::option::weighted(0.1, 0usize..400),
            top in proptest::sample::select(vec!["{}", "{}", "{}", "[]", "1", "\"x\"", "null", ""]),
            template in proptest::sample::select(vec![
                "",
                r#""output_sequence":3,"trade_id":4,"symbol":"BTC-USDT","buyer_user_id":1,"seller_user_id":2,"price":5,"quantity":6,"timestamp_ns":7"#,
                r#""output_sequence":3,"type":"deposit","user_id":1,"asset":"USDT","amount":5"#,
                r#""output_sequence":3,"type":"withdraw","user_id":1,"asset":"ETH","amount":5"#,
            ]),
        ) {
            // A template (valid on its own) and then fields that replace or add to it.
            let mut body: Vec<String> = vec![template.to_string()];
            body.retain(|b| !b.is_empty());
            body.extend(fields.iter().take(if template.is_empty() { 14 } else { 3 }).map(|(k, v)| format!("{k:?}:{v}")));
            let mut text = if top == "{}" { format!("{{{}}}", body.join(",")) } else { top.to_string() };
            if let Some(cut) = cut {
                text.truncate(cut.min(text.len()));
            }
            let new = json_position_only(parse_event(text.as_bytes()));
            let old = json_position_only(reference::parse_event_reference(text.as_bytes()));
            proptest::prop_assert_eq!(new, old, "message: {}", text);
        }
    }

    #[test]
    fn a_repeated_field_counts_with_its_last_value_and_unknown_ones_are_skipped() {
        let e = parse_event(br#"{"output_sequence":1,"type":"deposit","user_id":1,"asset":"BTC","amount":1,"amount":7,"x":{"y":[1,{"z":null}]}}"#).unwrap();
        let Event::Movement(m) = e else { panic!() };
        assert_eq!(m.amount, 7);
        assert_eq!(
            reason(r#"{"output_sequence":1,"type":null}"#),
            "field \"type\" must be a string, got null"
        );
        assert_eq!(
            reason(r#"{"output_sequence":"1"}"#),
            "field \"output_sequence\" must be a non-negative integer, got \"1\""
        );
    }
}
