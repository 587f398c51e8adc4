//! Compact containers for what a node keeps per service (at 10,000
//! services, per-entry overhead is most of its memory): [`Interner`], one
//! shared copy of each repeated text; and [`SortedVec`], a small sorted
//! set that holds its first elements inline, where a B-tree would
//! allocate a whole node for one element.

use std::{collections::HashSet, sync::Arc};

use smallvec::{Array, SmallVec};

/// A text held once and shared (a network id, a DNS name).
pub type Text = Arc<str>;

/// One copy of each text handed out; a text stays until it is
/// [`Interner::forget`]ten (network ids: few, and they come and go rarely).
#[derive(Debug, Default)]
pub struct Interner(HashSet<Text>);

impl Interner {
    /// The shared copy of `s`.
    pub fn get(&mut self, s: &str) -> Text {
        if let Some(t) = self.0.get(s) {
            return t.clone();
        }
        let t: Text = s.into();
        self.0.insert(t.clone());
        t
    }

    pub fn forget(&mut self, s: &str) {
        self.0.remove(s);
    }
}

/// A set kept sorted in a [`SmallVec`]: no allocation up to `A`'s size,
/// lookups by binary search, inserts and removals by moving the tail
/// (cheap at the sizes a service's tasks reach).
pub struct SortedVec<A: Array>(SmallVec<A>)
where
    A::Item: Ord;

impl<A: Array> Default for SortedVec<A>
where
    A::Item: Ord,
{
    fn default() -> Self {
        SortedVec(SmallVec::new())
    }
}

impl<A: Array> std::fmt::Debug for SortedVec<A>
where
    A::Item: Ord + std::fmt::Debug,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.0.iter()).finish()
    }
}

impl<A: Array> SortedVec<A>
where
    A::Item: Ord,
{
    /// Inserts `x` unless an equal element is in; whether it went in.
    pub fn insert(&mut self, x: A::Item) -> bool {
        match self.0.binary_search(&x) {
            Ok(_) => false,
            Err(i) => {
                self.0.insert(i, x);
                true
            }
        }
    }

    /// Removes the element equal to `x` by `cmp`, which must agree with
    /// the order (it may compare only a prefix of the element).
    pub fn remove_by(&mut self, cmp: impl FnMut(&A::Item) -> std::cmp::Ordering) -> bool {
        match self.0.binary_search_by(cmp) {
            Ok(i) => {
                self.0.remove(i);
                true
            }
            Err(_) => false,
        }
    }

    pub fn remove(&mut self, x: &A::Item) -> bool {
        self.remove_by(|y| y.cmp(x))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> std::slice::Iter<'_, A::Item> {
        self.0.iter()
    }
}

impl<'a, A: Array> IntoIterator for &'a SortedVec<A>
where
    A::Item: Ord,
{
    type Item = &'a A::Item;
    type IntoIter = std::slice::Iter<'a, A::Item>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sorted_vec_is_a_set_in_order() {
        let mut v = SortedVec::<[u32; 1]>::default();
        for x in [5, 1, 3, 1, 5] {
            v.insert(x);
        }
        assert_eq!(v.iter().copied().collect::<Vec<_>>(), [1, 3, 5]);
        assert!(v.remove(&3));
        assert!(!v.remove(&3));
        assert_eq!(v.iter().copied().collect::<Vec<_>>(), [1, 5]);
    }

    #[test]
    fn an_interner_hands_out_one_copy() {
        let mut i = Interner::default();
        let (a, b) = (i.get("net-a"), i.get("net-a"));
        assert!(Arc::ptr_eq(&a, &b));
        i.forget("net-a");
        assert!(!Arc::ptr_eq(&a, &i.get("net-a")));
    }
}
