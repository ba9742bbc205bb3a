//! settlement-wal: a durability engine for trade settlement.
//!
//! Every trade is first made durable in an application write-ahead log ([`wal`]); a fast
//! UNLOGGED batch to ScyllaDB/Cassandra follows, then a commit marker; a recovery pass at start-up
//! finishes whatever a crash interrupted, without ever applying a trade twice. See
//! `docs/architecture.md` (the design and promises P1-P10) and `wal-format.md` (the bytes on
//! disk).

#![deny(missing_docs)]

#[cfg(feature = "settlement")]
pub mod app;
#[cfg(feature = "settlement")]
pub mod ingest;
#[cfg(feature = "settlement")]
pub mod inspect_cli;
#[cfg(feature = "settlement")]
pub mod ledger;
#[cfg(feature = "settlement")]
pub mod observe;
#[cfg(feature = "settlement")]
pub mod settle;
pub mod wal;
