//! Store URLs: `embedded:PATH` or `cql://HOST:PORT[,HOST:PORT]/KEYSPACE[?options]`.

use std::path::PathBuf;
use std::str::FromStr;

use super::LedgerError;

/// Default embedded store path, relative to the working directory.
pub const DEFAULT_EMBEDDED_PATH: &str = "./data/ledger.redb";

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
    /// Statements per UNLOGGED batch (`batch_statements=`; default 20: measured at about 140
    /// bytes per statement, which keeps a batch near 3 KiB, under Cassandra's 5 KiB warning and
    /// far from its 50 KiB failure threshold).
    pub max_statements_per_batch: usize,
    /// Batches in flight at once per apply (`inflight=`; default 16).
    pub max_inflight_batches: usize,
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
            max_inflight_batches: 16,
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
                "inflight" => config.max_inflight_batches = num(v)?.clamp(1, 1024) as usize,
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
        ] {
            let err = bad.parse::<StoreUrl>().unwrap_err();
            assert!(matches!(err, LedgerError::BadUrl { .. }), "{bad}: {err}");
        }
    }
}
