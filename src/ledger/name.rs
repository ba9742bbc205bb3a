//! Short names kept inline: asset names ([`Asset`]) and trading pairs ([`Symbol`]).
//!
//! Every trade carries two asset names and touches four balance rows, so the pipeline used to
//! allocate (and free on another thread) a `String` for each of them several times per trade.
//! A [`ShortStr`] is a fixed-size `Copy` value instead: copying one is a 17- or 34-byte move.
//! It serializes exactly as a string (serde `str`), so the WAL's bincode bytes and the JSON
//! output are the same as with `String`.

use std::cmp::Ordering;
use std::fmt;
use std::ops::Deref;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::MAX_ASSET_LEN_BYTES;

/// Longest trading pair name (`BASE-QUOTE`), in bytes.
pub const MAX_SYMBOL_LEN_BYTES: usize = 2 * MAX_ASSET_LEN_BYTES + 1;

/// An asset name such as `BTC`: at most [`MAX_ASSET_LEN_BYTES`] bytes, stored inline.
pub type Asset = ShortStr<MAX_ASSET_LEN_BYTES>;

/// A trading pair name such as `BTC-USDT`: at most [`MAX_SYMBOL_LEN_BYTES`] bytes, stored inline.
pub type Symbol = ShortStr<MAX_SYMBOL_LEN_BYTES>;

/// A string of at most `CAP_BYTES` bytes (at most 255) stored inline, without allocation.
///
/// Compares, orders and prints like the `str` it holds.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ShortStr<const CAP_BYTES: usize> {
    len_bytes: u8,
    /// The string's bytes, then zeros (so derived equality and hashing are the string's).
    bytes: [u8; CAP_BYTES],
}

/// A name longer than its type holds.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("name {name:?} is {len_bytes} bytes long; at most {cap_bytes} bytes are allowed")]
pub struct NameTooLong {
    /// The name (cut to 64 bytes).
    pub name: String,
    /// Its length.
    pub len_bytes: usize,
    /// The most allowed.
    pub cap_bytes: usize,
}

impl<const CAP_BYTES: usize> ShortStr<CAP_BYTES> {
    const FITS_U8: () = assert!(CAP_BYTES <= u8::MAX as usize, "the length is kept in a u8");

    /// The empty string.
    pub const EMPTY: Self = {
        #[allow(clippy::let_unit_value)]
        let () = Self::FITS_U8;
        ShortStr {
            len_bytes: 0,
            bytes: [0; CAP_BYTES],
        }
    };

    /// Copies `name`, or says that it is too long.
    pub fn new(name: &str) -> Result<Self, NameTooLong> {
        if name.len() > CAP_BYTES {
            let mut cut = name.len().min(64);
            while !name.is_char_boundary(cut) {
                cut -= 1;
            }
            return Err(NameTooLong {
                name: name[..cut].to_string(),
                len_bytes: name.len(),
                cap_bytes: CAP_BYTES,
            });
        }
        let mut out = Self::EMPTY;
        out.bytes[..name.len()].copy_from_slice(name.as_bytes());
        out.len_bytes = name.len() as u8;
        Ok(out)
    }

    /// `a`, then `separator`, then `b`, or an error when the result is too long.
    pub fn joined(a: &str, separator: char, b: &str) -> Result<Self, NameTooLong> {
        let mut sep = [0u8; 4];
        let sep = separator.encode_utf8(&mut sep);
        let len = a.len() + sep.len() + b.len();
        if len > CAP_BYTES {
            return Self::new(&[a, &*sep, b].concat());
        }
        let mut out = Self::EMPTY;
        out.bytes[..a.len()].copy_from_slice(a.as_bytes());
        out.bytes[a.len()..a.len() + sep.len()].copy_from_slice(sep.as_bytes());
        out.bytes[a.len() + sep.len()..len].copy_from_slice(b.as_bytes());
        out.len_bytes = len as u8;
        Ok(out)
    }

    /// The string's bytes followed by zeros up to `CAP_BYTES`.
    pub(crate) fn padded_bytes(&self) -> &[u8; CAP_BYTES] {
        &self.bytes
    }

    /// The string.
    pub fn as_str(&self) -> &str {
        let len = usize::from(self.len_bytes);
        debug_assert!(len <= CAP_BYTES);
        debug_assert!(self.bytes[len..].iter().all(|&b| b == 0), "zero padding");
        // SAFETY: `bytes[..len]` was copied from a `&str` whole (`new`, `joined`), so it is
        // valid UTF-8; nothing else writes these fields.
        unsafe { std::str::from_utf8_unchecked(&self.bytes[..len]) }
    }
}

impl<const CAP_BYTES: usize> Deref for ShortStr<CAP_BYTES> {
    type Target = str;

    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl<const CAP_BYTES: usize> TryFrom<&str> for ShortStr<CAP_BYTES> {
    type Error = NameTooLong;

    fn try_from(name: &str) -> Result<Self, NameTooLong> {
        ShortStr::new(name)
    }
}

impl<const CAP_BYTES: usize> std::str::FromStr for ShortStr<CAP_BYTES> {
    type Err = NameTooLong;

    fn from_str(name: &str) -> Result<Self, NameTooLong> {
        ShortStr::new(name)
    }
}

impl<const CAP_BYTES: usize> AsRef<str> for ShortStr<CAP_BYTES> {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl<const CAP_BYTES: usize> PartialEq<str> for ShortStr<CAP_BYTES> {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl<const CAP_BYTES: usize> PartialEq<&str> for ShortStr<CAP_BYTES> {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl<const CAP_BYTES: usize> PartialEq<ShortStr<CAP_BYTES>> for &str {
    fn eq(&self, other: &ShortStr<CAP_BYTES>) -> bool {
        *self == other.as_str()
    }
}

impl<const CAP_BYTES: usize> Ord for ShortStr<CAP_BYTES> {
    fn cmp(&self, other: &Self) -> Ordering {
        self.as_str().cmp(other.as_str())
    }
}

impl<const CAP_BYTES: usize> PartialOrd for ShortStr<CAP_BYTES> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl<const CAP_BYTES: usize> fmt::Display for ShortStr<CAP_BYTES> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

impl<const CAP_BYTES: usize> fmt::Debug for ShortStr<CAP_BYTES> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl<const CAP_BYTES: usize> Serialize for ShortStr<CAP_BYTES> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de, const CAP_BYTES: usize> Deserialize<'de> for ShortStr<CAP_BYTES> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor<const CAP: usize>;
        impl<const CAP: usize> serde::de::Visitor<'_> for Visitor<CAP> {
            type Value = ShortStr<CAP>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "a string of at most {CAP} bytes")
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
                ShortStr::new(v).map_err(E::custom)
            }
        }
        deserializer.deserialize_str(Visitor::<CAP_BYTES>)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn too_long_names_are_refused_with_their_length() {
        let e = Asset::new("ABCDEFGHIJKLMNOPQ").unwrap_err();
        assert_eq!((e.len_bytes, e.cap_bytes), (17, 16));
        assert!(e.to_string().contains("17 bytes long; at most 16"), "{e}");
        assert_eq!(Asset::new("ABCDEFGHIJKLMNOP").unwrap(), "ABCDEFGHIJKLMNOP");
        assert!(Symbol::joined("ABCDEFGHIJKLMNOP", '-', "ABCDEFGHIJKLMNOPQ").is_err());
        assert_eq!(
            Symbol::joined("ABCDEFGHIJKLMNOP", '-', "ABCDEFGHIJKLMNOP").unwrap(),
            "ABCDEFGHIJKLMNOP-ABCDEFGHIJKLMNOP"
        );
    }

    #[test]
    fn serializes_exactly_as_a_string() {
        let a = Asset::new("USDT").unwrap();
        let wal_bytes = crate::wal::format::encode_payload(&a).unwrap();
        assert_eq!(
            wal_bytes,
            crate::wal::format::encode_payload(&"USDT".to_string()).unwrap()
        );
        let back: Asset = crate::wal::format::decode_payload(&wal_bytes).unwrap();
        assert_eq!(back, a);
        assert_eq!(serde_json::to_string(&a).unwrap(), "\"USDT\"");
        let long = crate::wal::format::encode_payload(&"X".repeat(17)).unwrap();
        let err = crate::wal::format::decode_payload::<Asset>(&long).unwrap_err();
        assert!(err.contains("at most 16 bytes"), "{err}");
    }

    proptest! {
        #[test]
        fn behaves_like_the_string(a in "\\PC{0,5}", b in "\\PC{0,5}") {
            prop_assume!(a.len() <= 16 && b.len() <= 16);
            let (sa, sb) = (Asset::new(&a).unwrap(), Asset::new(&b).unwrap());
            prop_assert_eq!(sa.as_str(), a.as_str());
            prop_assert_eq!(sa.cmp(&sb), a.cmp(&b));
            prop_assert_eq!(sa == sb, a == b);
            prop_assert_eq!(format!("{sa}"), a.clone());
            prop_assert_eq!(format!("{sa:?}"), format!("{a:?}"));
            let joined = format!("{a}-{b}");
            let symbol = Symbol::joined(&a, '-', &b).unwrap();
            prop_assert_eq!(symbol.as_str(), joined.as_str());
        }
    }
}
