//! Property tests of the constraint parser: no input panics it; whatever
//! it accepts is well formed; every well-formed constraint parses to what
//! it says.

use proptest::prelude::*;

use super::{Constraint, Field};

proptest! {
    #[test]
    fn no_text_panics_and_an_accepted_one_is_well_formed(text in ".{0,80}") {
        if let Ok(c) = text.parse::<Constraint>() {
            prop_assert!(!c.value.is_empty());
            prop_assert_eq!(c.value.trim(), c.value.as_str());
            let op = if c.equal { "==" } else { "!=" };
            prop_assert!(text.contains(op));
        }
    }

    #[test]
    fn a_well_formed_constraint_parses_to_what_it_says(
        field in prop_oneof![
            Just("node.id".to_owned()),
            Just("node.hostname".to_owned()),
            "[a-z][a-z0-9_.-]{0,15}".prop_map(|l| format!("node.labels.{l}")),
        ],
        equal in any::<bool>(),
        value in "[a-zA-Z0-9_.-]{1,20}",
        pad in " {0,2}",
    ) {
        let op = if equal { "==" } else { "!=" };
        let c: Constraint = format!("{pad}{field}{pad}{op}{pad}{value}{pad}").parse().unwrap();
        prop_assert_eq!(c.equal, equal);
        prop_assert_eq!(&c.value, &value);
        let want = match field.as_str() {
            "node.id" => Field::Id,
            "node.hostname" => Field::Hostname,
            l => Field::Label(l["node.labels.".len()..].to_owned()),
        };
        prop_assert_eq!(c.field, want);
    }
}
