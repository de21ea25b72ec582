//! A connection slab whose tokens carry a generation, so a completion addressed to a
//! connection that has since closed (and whose slot was reused) is recognised and dropped.

/// A slot index plus the generation of the slot when the token was issued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SlotToken {
    pub index: u32,
    pub generation: u32,
}

impl SlotToken {
    /// Packs into a `mio::Token` value: generation in the high half, index in the low half.
    pub fn to_usize(self) -> usize {
        ((self.generation as u64) << 32 | self.index as u64) as usize
    }

    pub fn from_usize(value: usize) -> SlotToken {
        let value = value as u64;
        SlotToken {
            index: value as u32,
            generation: (value >> 32) as u32,
        }
    }
}

struct Slot<T> {
    generation: u32,
    value: Option<T>,
}

/// Fixed-capacity slab. Indices stay below `capacity`, which is below `u32::MAX / 2`, so a
/// packed token never collides with the loop's reserved tokens near `usize::MAX`.
pub struct Slab<T> {
    slots: Vec<Slot<T>>,
    free: Vec<u32>,
    capacity: u32,
    len: u32,
}

impl<T> Slab<T> {
    pub fn new(capacity: u32) -> Slab<T> {
        assert!(capacity > 0 && capacity < u32::MAX / 2);
        Slab {
            slots: Vec::new(),
            free: Vec::new(),
            capacity,
            len: 0,
        }
    }

    pub fn len(&self) -> u32 {
        self.len
    }

    pub fn is_full(&self) -> bool {
        self.len >= self.capacity
    }

    /// Inserts a value built from its own token; `None` when the slab is full.
    pub fn insert_with(&mut self, build: impl FnOnce(SlotToken) -> T) -> Option<SlotToken> {
        if self.is_full() {
            return None;
        }
        let index = match self.free.pop() {
            Some(index) => index,
            None => {
                self.slots.push(Slot {
                    generation: 0,
                    value: None,
                });
                (self.slots.len() - 1) as u32
            }
        };
        let slot = &mut self.slots[index as usize];
        assert!(slot.value.is_none(), "free list held an occupied slot");
        let token = SlotToken {
            index,
            generation: slot.generation,
        };
        slot.value = Some(build(token));
        self.len += 1;
        Some(token)
    }

    pub fn get(&self, token: SlotToken) -> Option<&T> {
        let slot = self.slots.get(token.index as usize)?;
        if slot.generation != token.generation {
            return None;
        }
        slot.value.as_ref()
    }

    pub fn get_mut(&mut self, token: SlotToken) -> Option<&mut T> {
        let slot = self.slots.get_mut(token.index as usize)?;
        if slot.generation != token.generation {
            return None;
        }
        slot.value.as_mut()
    }

    pub fn remove(&mut self, token: SlotToken) -> Option<T> {
        let slot = self.slots.get_mut(token.index as usize)?;
        if slot.generation != token.generation {
            return None;
        }
        let value = slot.value.take()?;
        slot.generation = slot.generation.wrapping_add(1);
        self.free.push(token.index);
        self.len -= 1;
        Some(value)
    }

    /// Tokens of every occupied slot (for timers and shutdown sweeps).
    pub fn tokens(&self) -> Vec<SlotToken> {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, slot)| slot.value.is_some())
            .map(|(index, slot)| SlotToken {
                index: index as u32,
                generation: slot.generation,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_token_after_reuse_finds_nothing() {
        let mut slab = Slab::new(4);
        let first = slab.insert_with(|_| "a").unwrap();
        assert_eq!(slab.remove(first), Some("a"));
        let second = slab.insert_with(|_| "b").unwrap();
        assert_eq!(second.index, first.index, "slot is reused");
        assert!(
            slab.get_mut(first).is_none(),
            "old generation must not reach the new value"
        );
        assert_eq!(slab.get_mut(second), Some(&mut "b"));
        assert_eq!(SlotToken::from_usize(second.to_usize()), second);
    }

    #[test]
    fn capacity_is_a_hard_bound() {
        let mut slab = Slab::new(2);
        assert!(slab.insert_with(|_| 1).is_some());
        assert!(slab.insert_with(|_| 2).is_some());
        assert!(slab.insert_with(|_| 3).is_none());
        assert_eq!(slab.len(), 2);
        assert_eq!(slab.tokens().len(), 2);
    }
}
