//! The names of enum values on command lines and in CSVs (`shm`, `parallel_nodes`,
//! `vip_handoff`): one way to declare such an enum (`named_enum!`) and one error for a
//! name that is none of its values.
//!
//! ```text
//! named_enum! {
//!     /// How daemons are initialised.
//!     #[derive(serde::Serialize, serde::Deserialize)]
//!     #[serde(rename_all = "snake_case")]
//!     pub enum Strategy("strategy") { Sequential, ParallelNodes }
//! }
//! ```
//!
//! declares the enum (`Debug, Clone, Copy, PartialEq, Eq, Hash` and strum's `Display`,
//! `IntoStaticStr`, `VariantNames`, `EnumString`), `Strategy::name()`, and a `FromStr`
//! whose error reads `unknown strategy "x" (one of: sequential, parallel_nodes)`.

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

/// The parse error of a [`Named`] enum (its strum `parse_err_fn`).
pub fn unknown<T: Named>(given: &str) -> UnknownName {
    UnknownName {
        what: T::WHAT,
        given: given.to_string(),
        one_of: T::VARIANTS,
    }
}

/// Declares a named enum (see the module docs). Names are snake_case (strum's
/// `serialize_all`), the one spelling of values on every command line and in every CSV; a
/// variant can add spellings with `#[strum(to_string = "...", serialize = "...")]`.
macro_rules! named_enum {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident ($what:literal) {
            $($(#[$vmeta:meta])* $variant:ident),+ $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(
            Debug, Clone, Copy, PartialEq, Eq, Hash,
            ::strum::Display, ::strum::IntoStaticStr, ::strum::VariantNames, ::strum::EnumString,
        )]
        #[strum(
            serialize_all = "snake_case",
            parse_err_ty = $crate::names::UnknownName,
            parse_err_fn = $crate::names::unknown::<$name>
        )]
        $vis enum $name {
            $($(#[$vmeta])* $variant),+
        }

        impl $name {
            /// The name on the command line and in the CSV.
            pub fn name(self) -> &'static str {
                self.into()
            }
        }

        impl $crate::names::Named for $name {
            const WHAT: &'static str = $what;
        }
    };
}
pub(crate) use named_enum;

#[cfg(test)]
mod tests {
    named_enum! {
        /// A test enum.
        pub enum Colour("colour") {
            DeepRed,
            #[strum(to_string = "blue", serialize = "azure")]
            Blue,
        }
    }

    #[test]
    fn names_parse_print_and_refuse_with_the_list() {
        assert_eq!("deep_red".parse::<Colour>().unwrap(), Colour::DeepRed);
        assert_eq!("azure".parse::<Colour>().unwrap(), Colour::Blue);
        assert_eq!(Colour::Blue.to_string(), "blue");
        assert_eq!(Colour::DeepRed.name(), "deep_red");
        let e = "green".parse::<Colour>().unwrap_err();
        assert_eq!(
            e.to_string(),
            r#"unknown colour "green" (one of: deep_red, blue)"#
        );
    }
}
