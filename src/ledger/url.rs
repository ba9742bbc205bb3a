//! Store URLs: `embedded:PATH` or `cql://HOST:PORT[,HOST:PORT]/KEYSPACE[?options]`.
//!
//! CQL options (`key=value`, joined by `&`; numbers out of range are clamped to it):
//!
//! | option | meaning | default |
//! |---|---|---|
//! | `consistency` | `one`, `quorum`, `local_quorum`, `all` | `local_quorum` |
//! | `dc` | preferred datacenter (no failover to others) | none |
//! | `rf` | replication factor of a keyspace we create (1 to 16) | 1 |
//! | `connect_timeout_ms` | connection timeout | 5000 |
//! | `request_timeout_ms` | per-request timeout | 5000 |
//! | `max_attempts` | attempts per request before its outcome is unknown (1 to 100) | 5 |
//! | `batch_statements` | most statements per UNLOGGED batch (1 to 1000) | 20 |
//! | `batch_bytes` | most estimated bytes per UNLOGGED batch, as Cassandra counts them for its batch-size warning (1 to 1 MiB) | 4096 |
//! | `inflight` | batches in flight at once per apply (1 to 1024) | 16 |
//! | `inflight_reads` | reads in flight at once in a bulk read (recovery's lookups, balance reads; 1 to 1024) | 16 |
//! | `keys_per_read` | most keys per `IN` query of a bulk event lookup (1: one single-partition read per key; 1 to 1000) | 100 |

use std::path::PathBuf;
use std::str::FromStr;

use super::LedgerError;

/// Default embedded store path, relative to the working directory.
pub const DEFAULT_EMBEDDED_PATH: &str = "./data/ledger.redb";

/// Default most estimated bytes per UNLOGGED batch: 4 KiB, a fifth below the 5 KiB
/// `batch_size_warn_threshold` of Cassandra's default `cassandra.yaml` (and of
/// `tools/cassandra-node`), so the estimate's error never reaches the warning.
pub const DEFAULT_MAX_BATCH_BYTES: usize = 4 * 1024;
/// Largest `batch_bytes=` accepted (1 MiB; Cassandra's default failure threshold is 50 KiB).
pub const MAX_BATCH_BYTES_LIMIT: usize = 1024 * 1024;
/// Default reads in flight at once in one bulk read.
pub const DEFAULT_MAX_INFLIGHT_READS: usize = 16;
/// Default keys per `IN` query of a bulk event lookup. On the 2-core test node 100-key queries
/// looked up 17,000 trades 3-4 times faster than single-key reads with 64 in flight.
pub const DEFAULT_MAX_KEYS_PER_READ: usize = 100;
/// Largest `keys_per_read=` accepted.
pub const MAX_KEYS_PER_READ: usize = 1000;

/// Consistency level for CQL reads and writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Consistency {
    /// ONE: enough for a single local node.
    One,
    /// QUORUM.
    Quorum,
    /// LOCAL_QUORUM (the default).
    LocalQuorum,
    /// ALL.
    All,
}

impl FromStr for Consistency {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "one" => Ok(Consistency::One),
            "quorum" => Ok(Consistency::Quorum),
            "local_quorum" => Ok(Consistency::LocalQuorum),
            "all" => Ok(Consistency::All),
            other => Err(format!(
                "unknown consistency {other:?} (one, quorum, local_quorum, all)"
            )),
        }
    }
}

/// Everything needed to talk to ScyllaDB/Cassandra, with explicit limits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CqlConfig {
    /// `host:port` contact points.
    pub contact_points: Vec<String>,
    /// Keyspace (created when missing).
    pub keyspace: String,
    /// Consistency for writes and reads (`consistency=`; default LOCAL_QUORUM).
    pub consistency: Consistency,
    /// Local datacenter for load balancing (`dc=`).
    pub datacenter: Option<String>,
    /// Replication factor for a keyspace we create (`rf=`; SimpleStrategy; default 1).
    pub replication_factor: u32,
    /// Connection timeout (`connect_timeout_ms=`; default 5000).
    pub connect_timeout_ms: u64,
    /// Per-request timeout (`request_timeout_ms=`; default 5000).
    pub request_timeout_ms: u64,
    /// Attempts per write before its outcome is reported unknown (`max_attempts=`; default 5).
    pub max_attempts: u32,
    /// Most statements per UNLOGGED batch (`batch_statements=`, 1 to 1000; default 20).
    pub max_statements_per_batch: usize,
    /// Most estimated bytes per UNLOGGED batch (`batch_bytes=`, 1 to 1 MiB; default
    /// [`DEFAULT_MAX_BATCH_BYTES`]), counted the way Cassandra counts a batch for its
    /// `batch_size_warn_threshold` (see `cql::estimated_statement_bytes`). A batch ends at
    /// whichever limit it reaches first; a single statement above this limit goes alone.
    pub max_batch_bytes: usize,
    /// Batches in flight at once per apply (`inflight=`, 1 to 1024; default 16).
    pub max_inflight_batches: usize,
    /// Reads in flight at once in one bulk read (`Ledger::event_lsns`, `read_balances`;
    /// `inflight_reads=`, 1 to 1024; default [`DEFAULT_MAX_INFLIGHT_READS`]).
    pub max_inflight_reads: usize,
    /// Most keys per `IN` query of `Ledger::event_lsns` (`keys_per_read=`, 1 to
    /// [`MAX_KEYS_PER_READ`]; default [`DEFAULT_MAX_KEYS_PER_READ`]); 1 makes one token-aware
    /// single-partition read per key.
    pub max_keys_per_read: usize,
    /// Never create or alter the schema, refuse writes (inspection tools); not a URL option.
    pub read_only: bool,
}

impl CqlConfig {
    /// A config with defaults for `contact_points` and `keyspace`.
    pub fn new(contact_points: Vec<String>, keyspace: impl Into<String>) -> CqlConfig {
        CqlConfig {
            contact_points,
            keyspace: keyspace.into(),
            consistency: Consistency::LocalQuorum,
            datacenter: None,
            replication_factor: 1,
            connect_timeout_ms: 5000,
            request_timeout_ms: 5000,
            max_attempts: 5,
            max_statements_per_batch: 20,
            max_batch_bytes: DEFAULT_MAX_BATCH_BYTES,
            max_inflight_batches: 16,
            max_inflight_reads: DEFAULT_MAX_INFLIGHT_READS,
            max_keys_per_read: DEFAULT_MAX_KEYS_PER_READ,
            read_only: false,
        }
    }

    /// `cql://host:port,.../keyspace` (without options), for logs.
    pub fn display_url(&self) -> String {
        format!("cql://{}/{}", self.contact_points.join(","), self.keyspace)
    }
}

/// Where the ledger lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreUrl {
    /// The embedded redb store at this path.
    Embedded(PathBuf),
    /// A ScyllaDB/Cassandra cluster.
    Cql(CqlConfig),
}

impl Default for StoreUrl {
    fn default() -> Self {
        StoreUrl::Embedded(PathBuf::from(DEFAULT_EMBEDDED_PATH))
    }
}

impl std::fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreUrl::Embedded(p) => write!(f, "embedded:{}", p.display()),
            StoreUrl::Cql(c) => f.write_str(&c.display_url()),
        }
    }
}

impl FromStr for StoreUrl {
    type Err = LedgerError;

    fn from_str(url: &str) -> Result<StoreUrl, LedgerError> {
        let bad = |reason: &str| LedgerError::BadUrl {
            url: url.to_string(),
            reason: reason.to_string(),
        };
        if let Some(path) = url.strip_prefix("embedded:") {
            if path.is_empty() {
                return Err(bad("the embedded store needs a path"));
            }
            return Ok(StoreUrl::Embedded(PathBuf::from(path)));
        }
        let Some(rest) = url.strip_prefix("cql://") else {
            return Err(bad("unknown scheme"));
        };
        let (main, query) = rest.split_once('?').unwrap_or((rest, ""));
        let Some((hosts, keyspace)) = main.split_once('/') else {
            return Err(bad("missing /KEYSPACE"));
        };
        if keyspace.is_empty()
            || keyspace.len() > 48
            || !keyspace
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_')
            || !keyspace.starts_with(|c: char| c.is_ascii_alphabetic())
        {
            return Err(bad(
                "keyspace must start with a letter and hold only letters, digits and _ (at most 48)",
            ));
        }
        let mut contact_points = Vec::new();
        for host in hosts.split(',') {
            let Some((h, port)) = host.rsplit_once(':') else {
                return Err(bad("each contact point needs HOST:PORT"));
            };
            if h.is_empty() || port.parse::<u16>().is_err() {
                return Err(bad(
                    "each contact point needs HOST:PORT with a numeric port",
                ));
            }
            contact_points.push(host.to_string());
        }
        let mut config = CqlConfig::new(contact_points, keyspace);
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let Some((k, v)) = pair.split_once('=') else {
                return Err(bad("options are key=value pairs"));
            };
            let num = |v: &str| {
                v.parse::<u64>()
                    .map_err(|_| bad(&format!("option {k} needs a number")))
            };
            match k {
                "consistency" => config.consistency = v.parse().map_err(|e: String| bad(&e))?,
                "dc" => config.datacenter = Some(v.to_string()),
                "rf" => config.replication_factor = num(v)?.clamp(1, 16) as u32,
                "connect_timeout_ms" => config.connect_timeout_ms = num(v)?.max(1),
                "request_timeout_ms" => config.request_timeout_ms = num(v)?.max(1),
                "max_attempts" => config.max_attempts = num(v)?.clamp(1, 100) as u32,
                "batch_statements" => {
                    config.max_statements_per_batch = num(v)?.clamp(1, 1000) as usize
                }
                "batch_bytes" => {
                    config.max_batch_bytes = num(v)?.clamp(1, MAX_BATCH_BYTES_LIMIT as u64) as usize
                }
                "inflight" => config.max_inflight_batches = num(v)?.clamp(1, 1024) as usize,
                "inflight_reads" => config.max_inflight_reads = num(v)?.clamp(1, 1024) as usize,
                "keys_per_read" => {
                    config.max_keys_per_read = num(v)?.clamp(1, MAX_KEYS_PER_READ as u64) as usize
                }
                other => return Err(bad(&format!("unknown option {other:?}"))),
            }
        }
        Ok(StoreUrl::Cql(config))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_schemes_and_options() {
        assert_eq!(
            "embedded:./x.redb".parse::<StoreUrl>().unwrap(),
            StoreUrl::Embedded("./x.redb".into())
        );
        let StoreUrl::Cql(c) =
            "cql://127.0.0.1:9042,127.0.0.2:9043/settle?consistency=one&dc=dc1&rf=3"
                .parse::<StoreUrl>()
                .unwrap()
        else {
            panic!()
        };
        assert_eq!(c.contact_points, vec!["127.0.0.1:9042", "127.0.0.2:9043"]);
        assert_eq!(c.keyspace, "settle");
        assert_eq!(c.consistency, Consistency::One);
        assert_eq!(c.datacenter.as_deref(), Some("dc1"));
        assert_eq!(c.replication_factor, 3);
        assert_eq!(c.max_batch_bytes, DEFAULT_MAX_BATCH_BYTES);
        assert_eq!(c.max_inflight_reads, DEFAULT_MAX_INFLIGHT_READS);
        let StoreUrl::Cql(c) =
            "cql://127.0.0.1:9042/settle?batch_statements=50&batch_bytes=3000&inflight_reads=8&keys_per_read=5000"
                .parse::<StoreUrl>()
                .unwrap()
        else {
            panic!()
        };
        assert_eq!(
            (
                c.max_statements_per_batch,
                c.max_batch_bytes,
                c.max_inflight_reads,
                c.max_keys_per_read
            ),
            (50, 3000, 8, MAX_KEYS_PER_READ)
        );
    }

    #[test]
    fn rejects_bad_urls_with_a_reason() {
        for bad in [
            "",
            "embedded:",
            "postgres://x/y",
            "cql://127.0.0.1/ks",
            "cql://127.0.0.1:9042",
            "cql://127.0.0.1:9042/bad-name",
            "cql://127.0.0.1:9042/ks?consistency=two",
            "cql://127.0.0.1:9042/ks?nope=1",
            "cql://127.0.0.1:9042/ks?batch_bytes=4k",
            "cql://127.0.0.1:9042/ks?inflight_reads=",
        ] {
            let err = bad.parse::<StoreUrl>().unwrap_err();
            assert!(matches!(err, LedgerError::BadUrl { .. }), "{bad}: {err}");
        }
    }
}
