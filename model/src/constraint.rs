//! Placement constraints, as `docker service create --constraint` takes
//! them: `node.role==manager`, `node.labels.zone!=east`. Parsed and printed
//! here (a spec field's grammar); the orchestrator places tasks by them.

use std::{fmt, str::FromStr};

use crate::{Availability, Node, NodeStatus, Role};

/// What a constraint looks at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Field {
    Id,
    Hostname,
    Role,
    Label(String),
}

/// `node.role==manager`, `node.labels.zone!=east`, ... as in
/// `docker service create --constraint`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Constraint {
    pub field: Field,
    pub equal: bool,
    pub value: String,
}

impl FromStr for Constraint {
    type Err = String;

    fn from_str(text: &str) -> Result<Constraint, String> {
        let (lhs, rhs, equal) = match (text.split_once("=="), text.split_once("!=")) {
            (Some((l, r)), None) => (l, r, true),
            (None, Some((l, r))) => (l, r, false),
            _ => {
                return Err(format!(
                    "constraint {text:?}: expected FIELD==VALUE or FIELD!=VALUE, \
                     e.g. node.role==manager"
                ));
            }
        };
        let (lhs, value) = (lhs.trim(), rhs.trim());
        if value.is_empty() {
            return Err(format!("constraint {text:?}: the value is empty"));
        }
        let field = match lhs {
            "node.id" => Field::Id,
            "node.hostname" => Field::Hostname,
            "node.role" => {
                if value != "manager" && value != "worker" {
                    return Err(format!(
                        "constraint {text:?}: node.role is manager or worker, not {value:?}"
                    ));
                }
                Field::Role
            }
            _ => match lhs.strip_prefix("node.labels.") {
                Some(label) if !label.is_empty() => Field::Label(label.to_owned()),
                _ => {
                    return Err(format!(
                        "constraint {text:?}: unknown field {lhs:?}; use node.id, \
                         node.hostname, node.role or node.labels.NAME"
                    ));
                }
            },
        };
        Ok(Constraint {
            field,
            equal,
            value: value.to_owned(),
        })
    }
}

impl fmt::Display for Constraint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let field = match &self.field {
            Field::Id => "node.id".to_owned(),
            Field::Hostname => "node.hostname".to_owned(),
            Field::Role => "node.role".to_owned(),
            Field::Label(l) => format!("node.labels.{l}"),
        };
        let op = if self.equal { "==" } else { "!=" };
        write!(f, "{field}{op}{}", self.value)
    }
}

impl Constraint {
    pub fn matches(&self, node: &Node) -> bool {
        let actual = match &self.field {
            Field::Id => Some(node.id.as_str()),
            Field::Hostname => Some(node.hostname.as_str()),
            Field::Role => Some(match node.spec.role {
                Role::Manager => "manager",
                Role::Worker => "worker",
            }),
            Field::Label(l) => node.spec.labels.get(l).map(String::as_str),
        };
        // A missing label equals nothing, and differs from everything.
        (actual == Some(self.value.as_str())) == self.equal
    }
}

/// Parses every constraint of a spec; the first bad one is the error.
pub fn parse_constraints(texts: &[String]) -> Result<Vec<Constraint>, String> {
    texts.iter().map(|t| t.parse()).collect()
}

/// May `node` get a new task of a service with `constraints`?
pub fn takes(node: &Node, constraints: &[Constraint]) -> bool {
    node.status == NodeStatus::Ready
        && node.spec.availability == Availability::Active
        && constraints.iter().all(|c| c.matches(node))
}
