//! Features and tags computed incrementally at write time.
//!
//! Pure (no I/O): the store calls [`Engine::observe`] for each applied event
//! and [`Engine::settle`] once per touched user per entry, with the entry's
//! logical clock; reads call [`Engine::read`] with the wall clock.
//!
//! - [`window`]: bucketed sliding windows; [`feature`]: accumulators;
//! - [`filter`]: feature event filters; [`expr`]: the tag rule language;
//! - [`build`]: schema → engine (slots, dependency order, cycle check);
//! - [`identity`]: stable identities of definitions in stored state.

pub mod build;
pub mod expr;
pub mod feature;
pub mod filter;
pub mod identity;
pub mod state;
pub mod window;

use feature::CompiledFeature;

use crate::schema::ValueType;

/// A declared attribute rules can read (`family.attr`).
#[derive(Debug, Clone)]
pub struct AttrSlot {
    pub family: String,
    pub attr: String,
    pub ty: ValueType,
    /// `family.attr`, the name rules use.
    pub key: String,
    /// [`build::name_id`] of `key`: the attribute's identity in stored state.
    pub id: u64,
}

/// A compiled tag rule.
#[derive(Debug)]
pub struct CompiledTag {
    pub name: String,
    /// [`build::name_id`] of the name: the tag's identity in stored state.
    pub id: u64,
    pub slot: usize,
    pub rule: expr::Compiled,
    /// Can change with time alone (uses `now` or a windowed feature).
    pub time_dependent: bool,
    /// Another tag's rule reads this tag's value.
    pub read_by_tags: bool,
}

/// The compiled features and tags of one schema version.
#[derive(Debug)]
pub struct Engine {
    pub features: Vec<CompiledFeature>,
    /// In dependency order.
    pub tags: Vec<CompiledTag>,
    pub attrs: Vec<AttrSlot>,
    n_tags: usize,
}

/// Parses schema TOML and compiles its features and tags: a schema that
/// cannot be evaluated is never applied.
pub fn check_schema(toml: &str) -> Result<(crate::schema::Schema, Engine), crate::schema::SchemaError> {
    let schema = crate::schema::Schema::parse(toml)?;
    let engine = Engine::build(&schema)?;
    Ok((schema, engine))
}

/// [`check_schema`] and the checks a schema gets only when it is offered
/// (ApplySchema, CheckSchema), never when a replica applies a committed
/// one: names no rule could read ([`crate::schema::Schema::check_names`]).
/// A build that adds such a check then refuses new schemas only; one its
/// cluster committed earlier still applies alike on every replica.
pub fn check_new_schema(toml: &str) -> Result<(crate::schema::Schema, Engine), crate::schema::SchemaError> {
    let (schema, engine) = check_schema(toml)?;
    schema.check_names()?;
    Ok((schema, engine))
}

impl Engine {
    /// An engine with no features or tags.
    pub fn empty() -> Engine {
        Engine { features: Vec::new(), tags: Vec::new(), attrs: Vec::new(), n_tags: 0 }
    }

    pub fn is_empty(&self) -> bool {
        self.features.is_empty() && self.tags.is_empty() && self.attrs.is_empty()
    }

    /// Every input slot (features and attributes): settling with these
    /// re-evaluates every tag.
    pub fn all_inputs(&self) -> state::Dirty {
        (0..self.features.len()).chain(self.attr_slot(0)..self.n_slots()).collect()
    }

    fn n_slots(&self) -> usize {
        self.features.len() + self.n_tags + self.attrs.len()
    }

    fn attr_slot(&self, i: usize) -> usize {
        self.features.len() + self.n_tags + i
    }
}
