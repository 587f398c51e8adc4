//! Wire messages <-> model types. Model to wire is total (`From`); wire
//! to model checks what protobuf cannot say (`TryFrom`, with
//! [`WireError`] naming the field): a required message present, an enum
//! value known and not unspecified, an address that parses, a port in
//! range. What the model itself refuses (a name, a subnet overlap) is the
//! state machine's to say, as for any writer.

mod objects;
mod specs;
mod views;

use std::{net::Ipv4Addr, str::FromStr};

/// A wire message the model cannot take, and where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct WireError {
    /// The field's path, as `spec.endpoint.ports[0].target`.
    pub field: String,
    pub reason: String,
}

impl WireError {
    pub(crate) fn new(field: &str, reason: impl Into<String>) -> WireError {
        WireError {
            field: field.to_owned(),
            reason: reason.into(),
        }
    }

    /// The same error, under `outer` (`spec` + `mode` = `spec.mode`).
    pub(crate) fn under(self, outer: &str) -> WireError {
        WireError {
            field: if self.field.is_empty() {
                outer.to_owned()
            } else {
                format!("{outer}.{}", self.field)
            },
            reason: self.reason,
        }
    }
}

pub(crate) type Wire<T> = Result<T, WireError>;

/// A message field proto3 leaves optional and the model requires.
pub(crate) fn required<T>(v: Option<T>, field: &str) -> Wire<T> {
    v.ok_or_else(|| WireError::new(field, "missing"))
}

/// A nested message, converted; errors name the field.
pub(crate) fn nested<P, M>(v: Option<P>, field: &str) -> Wire<M>
where
    M: TryFrom<P, Error = WireError>,
{
    M::try_from(required(v, field)?).map_err(|e| e.under(field))
}

/// Each element converted; errors name the field and index.
pub(crate) fn each<P, M>(v: Vec<P>, field: &str) -> Wire<Vec<M>>
where
    M: TryFrom<P, Error = WireError>,
{
    v.into_iter()
        .enumerate()
        .map(|(i, p)| M::try_from(p).map_err(|e| e.under(&format!("{field}[{i}]"))))
        .collect()
}

pub(crate) fn ipv4(s: &str, field: &str) -> Wire<Ipv4Addr> {
    Ipv4Addr::from_str(s)
        .map_err(|_| WireError::new(field, format!("{s:?} is not an IPv4 address")))
}

pub(crate) fn subnet(s: &str, field: &str) -> Wire<model::Subnet> {
    model::Subnet::from_str(s).map_err(|e| WireError::new(field, e.0))
}

pub(crate) fn port(v: u32, field: &str) -> Wire<u16> {
    u16::try_from(v)
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| WireError::new(field, format!("{v} is not a port (1-65535)")))
}

/// Maps one wire enum to one model enum, both ways, with the wire's
/// unknown and unspecified values refused by name.
macro_rules! enum_map {
    ($wire:ident, $model:ty, $what:literal, { $($w:ident => $m:path),+ $(,)? }) => {
        impl From<$model> for crate::v1::$wire {
            fn from(m: $model) -> Self {
                match m { $($m => crate::v1::$wire::$w),+ }
            }
        }

        impl crate::convert::FromWire for $model {
            fn from_wire(v: i32, field: &str) -> crate::convert::Wire<$model> {
                match crate::v1::$wire::try_from(v) {
                    $(Ok(crate::v1::$wire::$w) => Ok($m),)+
                    #[allow(unreachable_patterns)]
                    Ok(other) => Err(crate::convert::WireError::new(
                        field,
                        format!("{} must be set ({})", $what, other.as_str_name()),
                    )),
                    Err(_) => Err(crate::convert::WireError::new(
                        field,
                        format!("{v} is not a known {}", $what),
                    )),
                }
            }
        }
    };
}
pub(crate) use enum_map;

/// A model enum read from a wire enum's `i32`.
pub trait FromWire: Sized {
    fn from_wire(v: i32, field: &str) -> Wire<Self>;
}

/// The wire value of a model enum.
pub(crate) fn wire<W: From<M> + Into<i32>, M>(m: M) -> i32 {
    W::from(m).into()
}
