//! Decoding record payloads for people (one line of text) and machines (JSON). A payload that
//! does not decode is shown as hex with the reason, never a panic.

use serde_json::{json, Value};

use crate::ledger::{Amount, BalanceKey};
use crate::settle::control::{ControlEntry, WalPayload};
use crate::settle::entry::SettlementEntry;
use crate::settle::event::Event;
use crate::wal::format::{decode_payload, CheckpointPayload, CommitPayload, RecordType};

/// Bytes of an undecodable payload shown as hex in the text output (JSON has them all).
const TEXT_HEX_BYTES: usize = 48;

/// A record's payload, decoded by its type.
pub(super) enum Payload {
    /// A settlement entry.
    Entry(Box<SettlementEntry>),
    /// A micro-batch's control entry (rejections, holes, high-water).
    Control(Box<ControlEntry>),
    /// A commit marker.
    Commit(CommitPayload),
    /// A checkpoint.
    Checkpoint(CheckpointPayload),
    /// Bytes that do not decode as what the record type says.
    Undecodable {
        /// Why.
        note: String,
    },
}

/// Decodes a payload by record type.
pub(super) fn decode(record_type: RecordType, payload: &[u8]) -> Payload {
    match record_type {
        RecordType::Entry => match WalPayload::decode(payload) {
            Ok(WalPayload::Settle(e)) => Payload::Entry(Box::new(e)),
            Ok(WalPayload::Control(c)) => Payload::Control(Box::new(c)),
            Err(reason) => Payload::Undecodable {
                note: format!("not a settlement entry ({reason})"),
            },
        },
        RecordType::Commit => match decode_payload::<CommitPayload>(payload) {
            Ok(c) => Payload::Commit(c),
            Err(reason) => Payload::Undecodable {
                note: format!("bad commit payload ({reason})"),
            },
        },
        RecordType::Checkpoint => match decode_payload::<CheckpointPayload>(payload) {
            Ok(c) => Payload::Checkpoint(c),
            Err(reason) => Payload::Undecodable {
                note: format!("bad checkpoint payload ({reason})"),
            },
        },
    }
}

/// Lower-case hex of `bytes`, cut after `max` bytes with a note.
pub(super) fn hex(bytes: &[u8], max: usize) -> String {
    let shown: String = bytes.iter().take(max).map(|b| format!("{b:02x}")).collect();
    if bytes.len() > max {
        format!("{shown}... ({} bytes)", bytes.len())
    } else {
        shown
    }
}

/// One line for an event.
pub(super) fn event_text(event: &Event) -> String {
    match event {
        Event::Trade(t) => format!(
            "trade {} {} buyer {} seller {} qty {} @ {} (ts {})",
            t.trade_id,
            t.symbol(),
            t.buyer_user_id,
            t.seller_user_id,
            t.quantity,
            t.price,
            t.timestamp_ns
        ),
        Event::Movement(m) => format!(
            "{} user {} {} {}",
            m.kind.name(),
            m.user_id,
            m.asset,
            m.amount
        ),
    }
}

/// `user 1 BTC=3, user 1 USDT=-30`.
pub(super) fn post_images_text(post_images: &[(BalanceKey, Amount)]) -> String {
    post_images
        .iter()
        .map(|(k, a)| format!("{k}={a}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The text detail of a record.
pub(super) fn detail_text(payload: &Payload, bytes: &[u8]) -> String {
    match payload {
        Payload::Entry(e) => format!(
            "seq {} {} -> {}",
            e.event.output_sequence(),
            event_text(&e.event),
            post_images_text(&e.post_images)
        ),
        Payload::Control(c) => control_text(c),
        Payload::Commit(c) => format!("commits entries {}..={}", c.first_lsn, c.last_lsn),
        Payload::Checkpoint(c) => format!(
            "committed watermark {}, first retained LSN {}",
            c.committed_watermark, c.first_retained_lsn
        ),
        Payload::Undecodable { note } => {
            format!("{note}; payload as hex: {}", hex(bytes, TEXT_HEX_BYTES))
        }
    }
}

/// One line for a control entry.
pub(super) fn control_text(c: &ControlEntry) -> String {
    let hw = &c.high_water;
    let mut text = format!(
        "control: sequences {}..={} accounted for, max trade_id {}",
        hw.first_sequence, hw.high_sequence, hw.max_trade_id
    );
    for r in &c.rejections {
        text.push_str(&format!("; rejected {} ({})", r.output_sequence, r.reason));
    }
    for h in &c.holes {
        text.push_str(&format!(
            "; hole {}..={} {}",
            h.first_sequence,
            h.last_sequence,
            if h.open { "open" } else { "closed" }
        ));
    }
    text
}

/// An event as JSON: `{"type": "trade"|"deposit"|"withdraw", ...}`.
pub(super) fn event_json(event: &Event) -> Value {
    match event {
        Event::Trade(t) => json!({
            "type": "trade",
            "output_sequence": t.output_sequence,
            "trade_id": t.trade_id,
            "symbol": t.symbol(),
            "buyer_user_id": t.buyer_user_id,
            "seller_user_id": t.seller_user_id,
            "price": t.price,
            "quantity": t.quantity,
            "timestamp_ns": t.timestamp_ns,
        }),
        Event::Movement(m) => json!({
            "type": m.kind.name(),
            "output_sequence": m.output_sequence,
            "user_id": m.user_id,
            "asset": m.asset,
            "amount": m.amount,
        }),
    }
}

/// Post-images as JSON rows.
pub(super) fn post_images_json(post_images: &[(BalanceKey, Amount)]) -> Value {
    Value::Array(
        post_images
            .iter()
            .map(|(k, a)| json!({"user_id": k.user_id, "asset": k.asset, "amount": a}))
            .collect(),
    )
}

/// The JSON detail of a record, merged into its object.
pub(super) fn detail_json(payload: &Payload, bytes: &[u8]) -> (&'static str, Value) {
    match payload {
        Payload::Entry(e) => (
            "entry",
            json!({
                "output_sequence": e.event.output_sequence(),
                "event": event_json(&e.event),
                "post_images": post_images_json(&e.post_images),
            }),
        ),
        Payload::Control(c) => ("control", json!(c)),
        Payload::Commit(c) => (
            "commit",
            json!({"first_lsn": c.first_lsn, "last_lsn": c.last_lsn}),
        ),
        Payload::Checkpoint(c) => (
            "checkpoint",
            json!({
                "committed_watermark": c.committed_watermark,
                "first_retained_lsn": c.first_retained_lsn,
            }),
        ),
        Payload::Undecodable { note } => (
            "undecodable",
            json!({"note": note, "hex": hex(bytes, usize::MAX)}),
        ),
    }
}

/// Does the event involve this user?
pub(super) fn touches_user(event: &Event, user: u64) -> bool {
    match event {
        Event::Trade(t) => t.buyer_user_id == user || t.seller_user_id == user,
        Event::Movement(m) => m.user_id == user,
    }
}

/// Is the event this trade?
pub(super) fn is_trade(event: &Event, trade_id: u64) -> bool {
    matches!(event, Event::Trade(t) if t.trade_id == trade_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_payloads_decode_as_hex_with_a_note() {
        let p = decode(RecordType::Entry, &[0xde, 0xad]);
        let text = detail_text(&p, &[0xde, 0xad]);
        assert!(text.contains("not a settlement entry"), "{text}");
        assert!(text.contains("dead"), "{text}");
        assert!(matches!(
            decode(RecordType::Commit, &[1]),
            Payload::Undecodable { .. }
        ));
        assert_eq!(hex(&[1, 2, 3], 2), "0102... (3 bytes)");
    }
}
