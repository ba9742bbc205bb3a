//! The control entry: what one micro-batch did to the dedup state (P9) and the store's
//! high-water (P8), as a WAL entry whose rows go to the store in the same apply as the batch's
//! data.
//!
//! Every micro-batch that accounted for at least one sequence ends with one control entry (the
//! batch's highest LSN): the rejections it recorded, the hole rows it opened, shrank, split or
//! closed, and the new high-water (first and highest sequence, highest trade id). Its LSN is the
//! high-water row's LSN, so an acknowledged apply moves the store's high-water to at least the
//! batch's last LSN, and the WAL's commit markers can never be ahead of it.
//!
//! On disk a control entry is the 4-byte tag [`CONTROL_TAG`] (little-endian `u32`) followed by
//! the bincode of [`ControlEntry`]. A settlement entry's bincode starts with its event's variant
//! index (0 trade, 1 movement), so the tag reads as a third variant and the WAL bytes of
//! settlement entries did not change; [`WalPayload::decode`] tells them apart.

use serde::{Deserialize, Serialize};

use super::entry::SettlementEntry;
use super::sequence::HoleChanges;
use crate::ledger::{
    bounded_reason, EntryWrites, EventKey, EventRow, HighWaterRow, HoleRow, RejectionRow,
};
use crate::wal::format::{decode_payload, encode_payload_into};
use crate::wal::Lsn;

/// The first four bytes of a control entry's payload.
pub const CONTROL_TAG: u32 = 2;

/// The high-water a batch leaves behind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HighWater {
    /// First sequence ever accounted for.
    pub first_sequence: u64,
    /// Highest sequence accounted for.
    pub high_sequence: u64,
    /// Highest trade id settled.
    pub max_trade_id: u64,
}

/// A rejection recorded by a batch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejected {
    /// The message's output sequence.
    pub output_sequence: u64,
    /// Why (at most [`crate::ledger::MAX_REJECTION_REASON_BYTES`]).
    pub reason: String,
}

/// A hole row's new state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HoleState {
    /// First missing sequence (the row's key).
    pub first_sequence: u64,
    /// Last missing sequence.
    pub last_sequence: u64,
    /// Still missing?
    pub open: bool,
}

/// The payload of a control entry.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlEntry {
    /// The high-water after the batch.
    pub high_water: HighWater,
    /// Sequences the batch rejected.
    pub rejections: Vec<Rejected>,
    /// Hole rows the batch changed.
    pub holes: Vec<HoleState>,
}

impl ControlEntry {
    /// Records a rejection (the reason bounded).
    pub fn reject(&mut self, output_sequence: u64, reason: &str) {
        self.rejections.push(Rejected {
            output_sequence,
            reason: bounded_reason(reason),
        });
    }

    /// Takes the hole rows a batch changed.
    pub fn set_holes(&mut self, changes: HoleChanges) {
        self.holes = changes
            .into_iter()
            .map(|(first_sequence, (last_sequence, open))| HoleState {
                first_sequence,
                last_sequence,
                open,
            })
            .collect();
    }

    /// Appends the WAL payload (tag, then bincode) to `buf`.
    pub fn encode_into(&self, buf: &mut Vec<u8>) {
        buf.extend_from_slice(&CONTROL_TAG.to_le_bytes());
        encode_payload_into(self, buf).expect("a control entry always encodes");
    }

    /// The store rows of this entry at `lsn`: the high-water row, then each rejection and hole
    /// row, one [`EntryWrites`] each (all with `lsn`).
    pub fn writes(&self, lsn: Lsn) -> Vec<EntryWrites> {
        let row = |event| EntryWrites {
            lsn,
            event: Some(event),
            balances: Vec::new(),
        };
        let mut out = Vec::with_capacity(1 + self.rejections.len() + self.holes.len());
        out.push(row(EventRow::HighWater(HighWaterRow {
            lsn,
            first_sequence: self.high_water.first_sequence,
            high_sequence: self.high_water.high_sequence,
            max_trade_id: self.high_water.max_trade_id,
        })));
        out.extend(self.rejections.iter().map(|r| {
            row(EventRow::Rejection(RejectionRow {
                output_sequence: r.output_sequence,
                reason: r.reason.clone(),
                lsn,
            }))
        }));
        out.extend(self.holes.iter().map(|h| {
            row(EventRow::Hole(HoleRow {
                first_sequence: h.first_sequence,
                last_sequence: h.last_sequence,
                open: h.open,
                lsn,
            }))
        }));
        out
    }

    /// The keys of [`ControlEntry::writes`], in the same order.
    pub fn keys(&self) -> Vec<EventKey> {
        let mut out = Vec::with_capacity(1 + self.rejections.len() + self.holes.len());
        out.push(EventKey::HighWater);
        out.extend(
            self.rejections
                .iter()
                .map(|r| EventKey::Rejection(r.output_sequence)),
        );
        out.extend(self.holes.iter().map(|h| EventKey::Hole(h.first_sequence)));
        out
    }
}

/// A settlement WAL entry of either kind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WalPayload {
    /// An event and its post-images.
    Settle(SettlementEntry),
    /// A batch's control entry.
    Control(ControlEntry),
}

impl WalPayload {
    /// Decodes either kind (see the module documentation).
    pub fn decode(bytes: &[u8]) -> Result<WalPayload, String> {
        let tag = bytes
            .get(..4)
            .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")));
        match tag {
            Some(CONTROL_TAG) => Ok(WalPayload::Control(decode_payload(&bytes[4..])?)),
            _ => Ok(WalPayload::Settle(SettlementEntry::decode(bytes)?)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::MovementKind;
    use crate::settle::event::{Event, Movement};

    #[test]
    fn control_and_settlement_entries_decode_apart() {
        let mut c = ControlEntry {
            high_water: HighWater {
                first_sequence: 1,
                high_sequence: 9,
                max_trade_id: 77,
            },
            ..ControlEntry::default()
        };
        c.reject(4, &"x".repeat(10_000));
        c.set_holes(HoleChanges::from([(5, (8, true))]));
        let mut buf = Vec::new();
        c.encode_into(&mut buf);
        let WalPayload::Control(back) = WalPayload::decode(&buf).unwrap() else {
            panic!("a control entry");
        };
        assert_eq!(back, c);
        assert_eq!(
            back.rejections[0].reason.len(),
            crate::ledger::MAX_REJECTION_REASON_BYTES
        );
        let keys = c.keys();
        let writes = c.writes(12);
        assert_eq!(keys.len(), writes.len());
        for (k, w) in keys.iter().zip(&writes) {
            assert_eq!(w.event.as_ref().unwrap().key(), *k);
            assert_eq!(w.lsn, 12);
        }
        let entry = SettlementEntry {
            event: Event::Movement(Movement {
                output_sequence: 3,
                kind: MovementKind::Deposit,
                user_id: 1,
                asset: crate::ledger::Asset::new("BTC").unwrap(),
                amount: 5,
            }),
            post_images: Default::default(),
        };
        assert_eq!(
            WalPayload::decode(&entry.encode()).unwrap(),
            WalPayload::Settle(entry)
        );
        assert!(WalPayload::decode(&[2, 0, 0, 0, 1]).is_err());
        assert!(WalPayload::decode(&[]).is_err());
    }
}
