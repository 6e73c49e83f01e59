//! The schema: attribute families with their TTL and history length, and
//! ingest settings. Written in TOML, validated here, replicated through raft
//! as an admin command. A default ships embedded (`default.toml`).

mod parse;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use parse::SchemaError;

/// The schema every node starts with until one is applied. It is version 0
/// of every shard, taken from the binary, not from a log: replicas on two
/// builds whose texts differ would validate and compute differently
/// (a rolling upgrade). Never edit it; a test pins its hash.
pub const DEFAULT_SCHEMA_TOML: &str = include_str!("default.toml");

/// One attribute family.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FamilySpec {
    /// `None`: values never expire.
    pub ttl_ms: Option<i64>,
    /// Events kept in the profile's last-N history.
    pub history_len: u32,
    /// Attributes tag rules may read as `family.attr`, with their types.
    pub attrs: BTreeMap<String, ValueType>,
}

/// The type of an attribute or feature value in rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ValueType {
    Str,
    Num,
    Bool,
}

/// How a feature aggregates the events it sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Aggregation {
    Count,
    Sum,
    Min,
    Max,
    Avg,
    DistinctCount,
    FirstTime,
    LastTime,
    LastValue,
    /// Counts per attribute value (a map); rules use `top`, `get`, `keys`.
    TopK,
}

/// A feature: an aggregation over one family's events.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeatureSpec {
    pub family: String,
    pub agg: Aggregation,
    /// The attribute aggregated (all aggregations but count/first_time/last_time).
    pub attr: Option<String>,
    /// Sliding window length; `None` = lifetime.
    pub window_ms: Option<i64>,
    /// Event filter, e.g. `type == "order" and amount >= 400`.
    pub filter: Option<String>,
    /// Value type of `last_value` (default `str`).
    pub value_type: ValueType,
    /// `count` only: the window starts at the first matching event and never
    /// slides (e.g. orders within 90 days of the first order).
    pub anchor_first: bool,
}

/// A tag: a rule over features, attributes, other tags and `now`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TagSpec {
    pub rule: String,
}

/// A validated schema.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Schema {
    pub families: BTreeMap<String, FamilySpec>,
    pub features: BTreeMap<String, FeatureSpec>,
    pub tags: BTreeMap<String, TagSpec>,
    pub dedupe_window_ms: i64,
    /// The TOML text it was parsed from.
    pub toml: String,
}

impl Schema {
    /// Parses and validates schema TOML.
    pub fn parse(toml_text: &str) -> Result<Schema, SchemaError> {
        parse::parse(toml_text)
    }

    /// Names a rule could never read, refused when a schema is offered
    /// (not when a committed one is applied; see
    /// [`crate::engine::check_new_schema`]): a feature or tag named by a
    /// reserved word of the tag language, or an attribute (declared, or a
    /// feature's) no event may carry.
    pub fn check_names(&self) -> Result<(), SchemaError> {
        parse::check_names(self)
    }

    /// The embedded default schema (parsed once per process).
    pub fn default_schema() -> Schema {
        VersionedSchema::shared_default().schema.clone()
    }

    pub fn family(&self, name: &str) -> Option<&FamilySpec> {
        self.families.get(name)
    }

    /// Family names, comma-separated, for error messages.
    pub fn family_list(&self) -> String {
        crate::validate::listed(self.families.keys().map(String::as_str))
    }
}

/// A schema together with the raft log index that applied it (0 = default).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionedSchema {
    pub version: u64,
    pub schema: Schema,
}

impl Default for VersionedSchema {
    fn default() -> Self {
        (*VersionedSchema::shared_default()).clone()
    }
}

impl VersionedSchema {
    /// Version 0, the embedded default schema, parsed once per process and
    /// shared: the schema in force until one is applied, looked up by every
    /// write (parsing its TOML per request cost about 4 % of a node's CPU).
    pub fn shared_default() -> std::sync::Arc<VersionedSchema> {
        static DEFAULT: std::sync::OnceLock<std::sync::Arc<VersionedSchema>> = std::sync::OnceLock::new();
        let parse = || Schema::parse(DEFAULT_SCHEMA_TOML).expect("embedded default schema is valid");
        DEFAULT.get_or_init(|| std::sync::Arc::new(VersionedSchema { version: 0, schema: parse() })).clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_schema_is_parsed_once_and_shared() {
        let (a, b) = (VersionedSchema::shared_default(), VersionedSchema::shared_default());
        assert!(std::sync::Arc::ptr_eq(&a, &b));
        assert_eq!(a.version, 0);
        assert_eq!(a.schema, Schema::parse(DEFAULT_SCHEMA_TOML).unwrap());
        assert_eq!(Schema::default_schema(), a.schema);
        assert_eq!(VersionedSchema::default(), *a);
    }

    /// Version 0 of every shard comes from the binary: a changed default
    /// would make replicas on an old and a new build diverge mid-upgrade.
    /// A new default needs a new way to reach existing clusters (applied
    /// through the log), not an edit of this text.
    #[test]
    fn the_default_schema_text_never_changes() {
        assert_eq!(xxhash_rust::xxh3::xxh3_64(DEFAULT_SCHEMA_TOML.as_bytes()), 12_064_206_509_837_863_152);
    }
}
