//! The tables of stable numbers and names that both protocols put on the wire (error codes,
//! the incubator's message types), declared once per protocol with [`wire_enum!`] (error
//! codes with [`error_codes!`]).

/// Declares an enum whose variants stand for stable numbers on the wire and stable names,
/// from one table: each variant's docs, its number and its name.
///
/// It generates the enum (`#[repr]` of the number type, `Debug`, `Clone`, `Copy`, `PartialEq`,
/// `Eq`, `Hash`, `PartialOrd`, `Ord`) and five items whose names and docs the caller gives, in
/// this order: the constant listing every variant in table order, the number of a variant,
/// the variant of a number (`None` for a number not in the table), the name of a variant, and
/// the variant of a name (`None` for a name not in the table). The table lists the variants
/// in ascending number order; numbers and names are unique (the tests check every table).
/// `Display` and anything else protocol-specific stay with the protocol.
macro_rules! wire_enum {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident: $repr:ident {
            $($(#[$variant_meta:meta])* $variant:ident = $number:literal => $text:literal,)+
        }
        $(#[$all_meta:meta])* $all_vis:vis const $all:ident;
        $(#[$number_meta:meta])* $number_vis:vis fn $to_number:ident;
        $(#[$from_number_meta:meta])* $from_number_vis:vis fn $from_number:ident;
        $(#[$name_meta:meta])* $name_vis:vis fn $to_name:ident;
        $(#[$from_name_meta:meta])* $from_name_vis:vis fn $from_name:ident;
    ) => {
        $(#[$meta])*
        #[repr($repr)]
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        $vis enum $name {
            $($(#[$variant_meta])* $variant = $number,)+
        }

        impl $name {
            $(#[$all_meta])*
            $all_vis const $all: [$name; [$(stringify!($variant)),+].len()] =
                [$($name::$variant),+];

            $(#[$number_meta])*
            $number_vis fn $to_number(self) -> $repr {
                self as $repr
            }

            $(#[$from_number_meta])*
            $from_number_vis fn $from_number(number: $repr) -> Option<$name> {
                match number {
                    $($number => Some($name::$variant),)+
                    _ => None,
                }
            }

            $(#[$name_meta])*
            $name_vis fn $to_name(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)+
                }
            }

            $(#[$from_name_meta])*
            $from_name_vis fn $from_name(name: &str) -> Option<$name> {
                match name {
                    $($text => Some($name::$variant),)+
                    _ => None,
                }
            }
        }
    };
}

/// Declares a protocol's stable error codes with [`wire_enum!`] from their table alone: `u32`
/// numbers, and the accessors `ALL`, `code`, `from_code`, `name` and `from_name`, documented
/// with the name of the protocol's error message (`"ERROR"`, `"Error"`).
macro_rules! error_codes {
    (
        $message:literal,
        $(#[$meta:meta])*
        $vis:vis enum $name:ident { $($table:tt)+ }
    ) => {
        $crate::wire_enum::wire_enum! {
            $(#[$meta])*
            $vis enum $name: u32 { $($table)+ }

            /// Every code, ascending.
            pub const ALL;
            #[doc = concat!("The number on the wire (", $message, ".code).")]
            pub fn code;
            /// The code with this number, if any.
            pub fn from_code;
            #[doc = concat!("The stable snake_case name (", $message, ".name).")]
            pub fn name;
            /// The code with this name, if any.
            pub fn from_name;
        }
    };
}

pub(crate) use {error_codes, wire_enum};

#[cfg(test)]
mod tests {
    use crate::{incubator, viewer};

    /// Checks one table: numbered from 1 without gaps in table order, and every variant comes
    /// back from its number and from its name (so numbers and names are unique).
    macro_rules! assert_table {
        ($all:expr, $to_number:ident, $from_number:path, $to_name:ident, $from_name:path) => {{
            let all = $all;
            let mut names = std::collections::BTreeSet::new();
            for (index, value) in all.into_iter().enumerate() {
                assert_eq!(u64::from(value.$to_number()), index as u64 + 1, "{value:?}");
                assert_eq!($from_number(value.$to_number()), Some(value));
                assert_eq!($from_name(value.$to_name()), Some(value));
                assert!(names.insert(value.$to_name()), "{value:?}: name taken");
            }
            assert_eq!($from_number(0), None);
            assert_eq!($from_number((all.len() + 1) as _), None);
            assert_eq!($from_name(""), None);
            all.len()
        }};
    }

    #[test]
    fn every_table_round_trips_through_its_numbers_and_names() {
        use incubator::{ErrorCode as IncubatorCode, MessageType};
        use viewer::ErrorCode as ViewerCode;
        let incubator_codes = assert_table!(
            IncubatorCode::ALL,
            code,
            IncubatorCode::from_code,
            name,
            IncubatorCode::from_name
        );
        let viewer_codes = assert_table!(
            ViewerCode::ALL,
            code,
            ViewerCode::from_code,
            name,
            ViewerCode::from_name
        );
        let message_types = assert_table!(
            MessageType::ALL,
            as_u8,
            MessageType::from_u8,
            name,
            MessageType::from_name
        );
        assert_eq!((incubator_codes, viewer_codes, message_types), (22, 29, 12));
    }

    #[test]
    fn numbers_and_names_are_the_documented_ones() {
        // A few rows of each table as docs/protocol/*.md lists them: the macro must not
        // renumber or rename anything.
        assert_eq!(incubator::ErrorCode::FrameTooLarge.code(), 2);
        assert_eq!(incubator::ErrorCode::EnrolmentPending.code(), 22);
        assert_eq!(
            incubator::ErrorCode::UnknownMessageType.name(),
            "unknown_message_type"
        );
        assert_eq!(viewer::ErrorCode::LoginRequired.code(), 4);
        assert_eq!(viewer::ErrorCode::ComputerNotLicensed.code(), 28);
        assert_eq!(
            viewer::ErrorCode::TooManyRequests.name(),
            "too_many_requests"
        );
        assert_eq!(incubator::MessageType::SyncStateResult.as_u8(), 7);
        assert_eq!(incubator::MessageType::Ping.name(), "PING");
    }
}
