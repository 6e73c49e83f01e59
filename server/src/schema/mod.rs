//! The schema: attribute families with their TTL and history length, and
//! ingest settings. Written in TOML, validated here, replicated through raft
//! as an admin command. A default ships embedded (`default.toml`).

mod parse;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use parse::SchemaError;

/// The schema every node starts with until one is applied.
pub const DEFAULT_SCHEMA_TOML: &str = include_str!("default.toml");

/// One attribute family.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FamilySpec {
    /// `None`: values never expire.
    pub ttl_ms: Option<i64>,
    /// Events kept in the profile's last-N history.
    pub history_len: u32,
}

/// A validated schema.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Schema {
    pub families: BTreeMap<String, FamilySpec>,
    pub dedupe_window_ms: i64,
    /// The TOML text it was parsed from.
    pub toml: String,
}

impl Schema {
    /// Parses and validates schema TOML.
    pub fn parse(toml_text: &str) -> Result<Schema, SchemaError> {
        parse::parse(toml_text)
    }

    /// The embedded default schema.
    pub fn default_schema() -> Schema {
        Schema::parse(DEFAULT_SCHEMA_TOML).expect("embedded default schema is valid")
    }

    pub fn family(&self, name: &str) -> Option<&FamilySpec> {
        self.families.get(name)
    }

    /// Family names, comma-separated, for error messages.
    pub fn family_list(&self) -> String {
        self.families.keys().cloned().collect::<Vec<_>>().join(", ")
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
        VersionedSchema { version: 0, schema: Schema::default_schema() }
    }
}
