//! Stable identities of definitions in stored state.
//!
//! A user's feature states are stored under their feature's identity, not
//! its name: a renamed feature keeps its state, a feature whose meaning
//! changed starts over. The identity is the hash of a hand-written
//! canonical encoding of the definition, field by field, each with its own
//! tag, so that it depends only on what the definition means:
//! - not on Rust's `Debug` output or on serde's derived layout (both change
//!   when a field is added to `FeatureSpec`, which reset every user's state);
//! - a field at its default value is left out. The default of a new field
//!   must be the behaviour from before the field existed, so adding one keeps
//!   every existing identity (see the test
//!   `a_field_at_its_default_is_left_out`).
//!
//! Rules for changing [`feature_encoding`]: never reuse or renumber a tag or
//! an enum code; a new field gets the next tag and is written only when it
//! differs from its default. Anything else changes every stored identity
//! and needs a storage format bump (`store::format`).

use crate::schema::{Aggregation, FeatureSpec, ValueType};

/// FNV-1a: stable across processes, platforms and releases (unlike
/// `DefaultHasher`), so every replica and every release agrees.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ *b as u64).wrapping_mul(0x100_0000_01b3))
}

/// A feature's identity in stored state: the hash of its canonical encoding.
pub fn feature_id(spec: &FeatureSpec) -> u64 {
    fnv1a(&feature_encoding(spec))
}

// Field tags of the feature encoding. Never reuse or renumber one.
const FAMILY: u8 = 1;
const AGG: u8 = 2;
const ATTR: u8 = 3;
const WINDOW_MS: u8 = 4;
const FILTER: u8 = 5;
const VALUE_TYPE: u8 = 6;
const ANCHOR_FIRST: u8 = 7;

/// The canonical encoding of a feature definition: `[tag][payload]` per
/// field in tag order; strings as `[u32 LE length][UTF-8]`, integers as
/// 8 bytes LE, enums as the one-byte codes below. Optional fields at their
/// default (no attribute, lifetime window, no filter, `str`, sliding
/// window) are left out. The filter is its text as written.
pub fn feature_encoding(spec: &FeatureSpec) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    put_str(&mut out, FAMILY, &spec.family);
    out.extend_from_slice(&[AGG, agg_code(spec.agg)]);
    if let Some(attr) = &spec.attr {
        put_str(&mut out, ATTR, attr);
    }
    if let Some(ms) = spec.window_ms {
        out.push(WINDOW_MS);
        out.extend_from_slice(&ms.to_le_bytes());
    }
    if let Some(filter) = &spec.filter {
        put_str(&mut out, FILTER, filter);
    }
    if spec.value_type != ValueType::Str {
        out.extend_from_slice(&[VALUE_TYPE, value_type_code(spec.value_type)]);
    }
    if spec.anchor_first {
        out.extend_from_slice(&[ANCHOR_FIRST, 1]);
    }
    out
}

fn put_str(out: &mut Vec<u8>, tag: u8, s: &str) {
    out.push(tag);
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// Explicit codes: the enum's declaration order may change, these may not.
fn agg_code(agg: Aggregation) -> u8 {
    match agg {
        Aggregation::Count => 1,
        Aggregation::Sum => 2,
        Aggregation::Min => 3,
        Aggregation::Max => 4,
        Aggregation::Avg => 5,
        Aggregation::DistinctCount => 6,
        Aggregation::FirstTime => 7,
        Aggregation::LastTime => 8,
        Aggregation::LastValue => 9,
        Aggregation::TopK => 10,
    }
}

fn value_type_code(t: ValueType) -> u8 {
    match t {
        ValueType::Str => 1,
        ValueType::Num => 2,
        ValueType::Bool => 3,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> FeatureSpec {
        FeatureSpec {
            family: "trade".into(),
            agg: Aggregation::Sum,
            attr: Some("amount".into()),
            window_ms: Some(30 * 86_400_000),
            filter: Some(r#"type == "order""#.into()),
            value_type: ValueType::Str,
            anchor_first: false,
        }
    }

    /// Pinned: identities are stored in every user's state, so a change of
    /// this value means every user's feature states would be discarded
    /// after an upgrade. If this fails, the encoding changed by accident
    /// (or, on purpose, with a storage format bump).
    #[test]
    fn identity_is_pinned() {
        assert_eq!(feature_id(&spec()), 0x8290_5b04_3229_2712, "{:#x}", feature_id(&spec()));
        let count = FeatureSpec {
            family: "browse".into(),
            agg: Aggregation::Count,
            attr: None,
            window_ms: None,
            filter: None,
            value_type: ValueType::Str,
            anchor_first: false,
        };
        assert_eq!(feature_id(&count), 0xbccb_73e7_2431_7a8d, "{:#x}", feature_id(&count));
    }

    /// How adding a field keeps identities: `value_type` and `anchor_first`
    /// stand in for a field added later. At their defaults they add no
    /// bytes, so the encoding is exactly the one written from the older
    /// fields alone (built here by hand), and the identity is unchanged. A
    /// `Debug`- or serde-derived encoding fails this: it spells out every
    /// field, defaults included.
    #[test]
    fn a_field_at_its_default_is_left_out() {
        let mut older_fields = vec![FAMILY, 5, 0, 0, 0];
        older_fields.extend_from_slice(b"trade");
        older_fields.extend_from_slice(&[AGG, 2, ATTR, 6, 0, 0, 0]);
        older_fields.extend_from_slice(b"amount");
        older_fields.push(WINDOW_MS);
        older_fields.extend_from_slice(&(30i64 * 86_400_000).to_le_bytes());
        older_fields.extend_from_slice(&[FILTER, 15, 0, 0, 0]);
        older_fields.extend_from_slice(br#"type == "order""#);
        assert_eq!(feature_encoding(&spec()), older_fields);
        assert_eq!(feature_id(&spec()), fnv1a(&older_fields));
        // Set to something else, a field is part of the meaning.
        let anchored = FeatureSpec { anchor_first: true, ..spec() };
        assert_ne!(feature_id(&anchored), feature_id(&spec()));
        let typed = FeatureSpec { value_type: ValueType::Num, ..spec() };
        assert_ne!(feature_id(&typed), feature_id(&spec()));
    }

    #[test]
    fn every_field_counts_and_fields_do_not_run_together() {
        let base = feature_id(&spec());
        let changed = [
            FeatureSpec { family: "browse".into(), ..spec() },
            FeatureSpec { agg: Aggregation::Max, ..spec() },
            FeatureSpec { attr: Some("price".into()), ..spec() },
            FeatureSpec { window_ms: Some(7 * 86_400_000), ..spec() },
            FeatureSpec { window_ms: None, ..spec() },
            FeatureSpec { filter: None, ..spec() },
        ];
        for c in &changed {
            assert_ne!(feature_id(c), base, "{c:?}");
        }
        // Length prefixes: ("ab", "c") and ("a", "bc") are different fields.
        let a = FeatureSpec { attr: Some("ab".into()), filter: Some("c".into()), ..spec() };
        let b = FeatureSpec { attr: Some("a".into()), filter: Some("bc".into()), ..spec() };
        assert_ne!(feature_id(&a), feature_id(&b));
    }
}
