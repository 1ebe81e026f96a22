//! Failure classes shared by every error type of the library.
//!
//! Each error says which class it belongs to, so a caller decides what to do without
//! parsing messages: fix the call, wait and retry, record a rejection, or alert an operator.
//! The CLI turns the class into its exit code (`3` for [`ErrorClass::Rejected`] and
//! [`ErrorClass::Refused`], `1` otherwise) and the JSON document's `reason`.

/// What kind of failure an error is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    /// The call cannot be done as asked (arguments, registration, a window not open): the
    /// caller fixes the call or its timing.
    Caller,
    /// Something the call needs is not (yet) there; waiting may help.
    NotFound,
    /// An object was read, verified and refused; the error carries a stable reason code.
    Rejected,
    /// The call was refused for a rule of the run, with a stable reason code
    /// (`window_closed`, `window_not_open`, …): a script reacts to the code (wait, skip,
    /// bootstrap) instead of parsing a message.
    Refused,
    /// Another object already holds the name with different content; nothing was
    /// overwritten.
    Conflict,
    /// The store or the local disk failed (network, permissions, timeouts); the source
    /// error is kept for the operator.
    Store,
    /// A failure of this program or its device, not of any input.
    Internal,
}

impl ErrorClass {
    /// The stable name used in logs and JSON documents.
    pub fn name(self) -> &'static str {
        match self {
            ErrorClass::Caller => "caller",
            ErrorClass::NotFound => "not_found",
            ErrorClass::Rejected => "rejected",
            ErrorClass::Refused => "refused",
            ErrorClass::Conflict => "conflict",
            ErrorClass::Store => "store",
            ErrorClass::Internal => "internal",
        }
    }

    /// The process exit code the CLI uses for this class: `3` means "refused, with a reason
    /// code" (an object verified and rejected, or a call against the run's rules), so
    /// scripts can tell those from a failure to check.
    pub fn exit_code(self) -> u8 {
        match self {
            ErrorClass::Rejected | ErrorClass::Refused => 3,
            _ => 1,
        }
    }
}

/// Implemented by every error type of the library.
pub trait Classified {
    /// The failure class.
    fn class(&self) -> ErrorClass;
    /// The stable reason code, for rejections (`bad_signature`, `non_finite`, …).
    fn reason(&self) -> Option<&'static str>;
    /// The object (URL or path) the failure is about, when there is one: what a Python
    /// caller reads as `Rejected.object`.
    fn object(&self) -> Option<&str> {
        None
    }
}

/// Defines a closed set of stable reason codes as an enum with `ALL` (the order of its table
/// in `schemas/`), `code()`, `parse()` and `Display`: a code is a type, so a typo does not
/// compile, and a test compares each set with its table (`pipeline/tests/it/codes.rs`).
macro_rules! reason_codes {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident {
            $($(#[$vmeta:meta])* $variant:ident = $code:literal,)+
        }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        $vis enum $name {
            $($(#[$vmeta])* $variant,)+
        }

        impl $name {
            /// Every code, in the order of its table in `schemas/`.
            pub const ALL: &'static [$name] = &[$($name::$variant,)+];

            /// The stable code, as ledgers, JSON documents and Python exceptions carry it.
            pub fn code(self) -> &'static str {
                match self {
                    $($name::$variant => $code,)+
                }
            }

            /// The inverse of [`Self::code`].
            pub fn parse(s: &str) -> Option<$name> {
                Self::ALL.iter().copied().find(|c| c.code() == s)
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.code())
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.code() == other
            }
        }

        impl PartialEq<$name> for str {
            fn eq(&self, other: &$name) -> bool {
                self == other.code()
            }
        }

        impl PartialEq<$name> for String {
            fn eq(&self, other: &$name) -> bool {
                self.as_str() == other.code()
            }
        }
    };
}
pub(crate) use reason_codes;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_reasoned_refusals_exit_3() {
        let all = [
            ErrorClass::Caller,
            ErrorClass::NotFound,
            ErrorClass::Rejected,
            ErrorClass::Refused,
            ErrorClass::Conflict,
            ErrorClass::Store,
            ErrorClass::Internal,
        ];
        let threes: Vec<_> = all.iter().filter(|c| c.exit_code() == 3).collect();
        assert_eq!(threes, [&ErrorClass::Rejected, &ErrorClass::Refused]);
        let names: std::collections::HashSet<_> = all.iter().map(|c| c.name()).collect();
        assert_eq!(names.len(), all.len());
    }
}
