//! The names of enum values on command lines and in CSVs (`shm`, `parallel_nodes`,
//! `vip_handoff`): one derive set and one error for every such enum.
//!
//! An enum derives `strum::Display`, `strum::IntoStaticStr`, `strum::VariantNames` and
//! `strum::EnumString` with `#[strum(serialize_all = "snake_case")]`, implements [`Named`]
//! and points its parse error at [`unknown`], so that a bad name reads
//! `unknown strategy "x" (one of: shm, mutex, central)`:
//!
//! ```
//! #[derive(Debug, PartialEq, strum::Display, strum::IntoStaticStr, strum::VariantNames, strum::EnumString)]
//! #[strum(serialize_all = "snake_case")]
//! #[strum(parse_err_ty = blocklab::names::UnknownName, parse_err_fn = blocklab::names::unknown::<Colour>)]
//! enum Colour { DeepRed, Blue }
//! impl blocklab::names::Named for Colour { const WHAT: &'static str = "colour"; }
//!
//! assert_eq!("deep_red".parse::<Colour>().unwrap(), Colour::DeepRed);
//! assert_eq!(Colour::Blue.to_string(), "blue");
//! let e = "green".parse::<Colour>().unwrap_err();
//! assert_eq!(e.to_string(), r#"unknown colour "green" (one of: deep_red, blue)"#);
//! ```

/// A name that is none of an enum's values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} {given:?} (one of: {})", one_of.join(", "))]
pub struct UnknownName {
    /// What the enum names (`strategy`, `phase`).
    pub what: &'static str,
    pub given: String,
    pub one_of: &'static [&'static str],
}

/// An enum whose values have names: what it names, for error messages.
pub trait Named: strum::VariantNames {
    const WHAT: &'static str;
}

/// The parse error of a [`Named`] enum (its `parse_err_fn`).
pub fn unknown<T: Named>(given: &str) -> UnknownName {
    UnknownName {
        what: T::WHAT,
        given: given.to_string(),
        one_of: T::VARIANTS,
    }
}
