//! [`ByNetwork`]: a value per network id, for the few networks one
//! service is on. A sorted vector, not a B-tree: a B-tree allocates a
//! whole node (eleven slots) for one entry, and at 10,000 services every
//! node's replica pays it per service. On the wire it is a map, as the
//! B-tree was (postcard writes a map and a sequence of pairs alike; JSON
//! keeps its object).

use std::{fmt, marker::PhantomData};

use serde::{
    Deserialize, Deserializer, Serialize, Serializer,
    de::{MapAccess, Visitor},
    ser::SerializeMap,
};

/// Network id -> `V`, sorted by id, each id once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ByNetwork<V>(Vec<(String, V)>);

impl<V> Default for ByNetwork<V> {
    fn default() -> Self {
        ByNetwork(Vec::new())
    }
}

impl<V> ByNetwork<V> {
    pub fn new() -> Self {
        Self::default()
    }

    fn find(&self, network: &str) -> Result<usize, usize> {
        self.0.binary_search_by(|(k, _)| k.as_str().cmp(network))
    }

    pub fn get(&self, network: &str) -> Option<&V> {
        self.find(network).ok().map(|i| &self.0[i].1)
    }

    pub fn contains_key(&self, network: &str) -> bool {
        self.find(network).is_ok()
    }

    /// Sets `network`'s value; the one it replaces.
    pub fn insert(&mut self, network: String, value: V) -> Option<V> {
        match self.find(&network) {
            Ok(i) => Some(std::mem::replace(&mut self.0[i].1, value)),
            Err(i) => {
                self.0.insert(i, (network, value));
                None
            }
        }
    }

    pub fn remove(&mut self, network: &str) -> Option<V> {
        self.find(network).ok().map(|i| self.0.remove(i).1)
    }

    /// (network, value), by network.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &V)> {
        self.0.iter().map(|(k, v)| (k, v))
    }

    pub fn keys(&self) -> impl Iterator<Item = &String> {
        self.0.iter().map(|(k, _)| k)
    }

    pub fn values(&self) -> impl Iterator<Item = &V> {
        self.0.iter().map(|(_, v)| v)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn clear(&mut self) {
        self.0.clear();
    }
}

impl<'a, V> IntoIterator for &'a ByNetwork<V> {
    type Item = (&'a String, &'a V);
    type IntoIter =
        std::iter::Map<std::slice::Iter<'a, (String, V)>, fn(&(String, V)) -> (&String, &V)>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter().map(|(k, v)| (k, v))
    }
}

/// Later pairs win, as a map's insert would.
impl<V> FromIterator<(String, V)> for ByNetwork<V> {
    fn from_iter<I: IntoIterator<Item = (String, V)>>(iter: I) -> Self {
        let mut m = ByNetwork::new();
        for (k, v) in iter {
            m.insert(k, v);
        }
        m.0.shrink_to_fit();
        m
    }
}

impl<V, const N: usize> From<[(String, V); N]> for ByNetwork<V> {
    fn from(pairs: [(String, V); N]) -> Self {
        pairs.into_iter().collect()
    }
}

impl<V: Serialize> Serialize for ByNetwork<V> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

impl<'de, V: Deserialize<'de>> Deserialize<'de> for ByNetwork<V> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Pairs<V>(PhantomData<V>);
        impl<'de, V: Deserialize<'de>> Visitor<'de> for Pairs<V> {
            type Value = ByNetwork<V>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a map from network id")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<Self::Value, A::Error> {
                // A hostile peer's length is not trusted for the capacity.
                let mut v = Vec::with_capacity(a.size_hint().unwrap_or(0).min(64));
                while let Some((k, x)) = a.next_entry::<String, V>()? {
                    v.push((k, x));
                }
                Ok(v.into_iter().collect())
            }
        }
        d.deserialize_map(Pairs(PhantomData))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn it_is_a_sorted_map() {
        let mut m: ByNetwork<u32> = [("b".to_string(), 2), ("a".to_string(), 1)]
            .into_iter()
            .collect();
        assert_eq!(m.insert("b".into(), 3), Some(2));
        assert_eq!(m.get("b"), Some(&3));
        assert!(m.contains_key("a") && !m.contains_key("c"));
        assert_eq!(m.keys().collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(m.remove("a"), Some(1));
        assert_eq!(m.len(), 1);
    }

    /// The B-tree it replaced, byte for byte in postcard and in JSON.
    #[test]
    fn on_the_wire_it_is_the_map_it_replaced() {
        let tree: BTreeMap<String, u32> = [("net-a".into(), 7), ("net-b".into(), 9)].into();
        let ours: ByNetwork<u32> = tree.clone().into_iter().collect();
        assert_eq!(
            postcard::to_stdvec(&ours).unwrap(),
            postcard::to_stdvec(&tree).unwrap()
        );
        assert_eq!(
            serde_json::to_string(&ours).unwrap(),
            serde_json::to_string(&tree).unwrap()
        );
        let back: ByNetwork<u32> =
            postcard::from_bytes(&postcard::to_stdvec(&tree).unwrap()).unwrap();
        assert_eq!(back, ours);
    }
}
