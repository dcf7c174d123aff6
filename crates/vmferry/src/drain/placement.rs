//! Where each guest of a drained host goes: largest guest first, each on the destination
//! with the most memory left after the guests placed before it.
//!
//! Pure arithmetic on sizes: it must never talk to a daemon or look at the clock, so the
//! same figures always give the same plan (and tests need no hosts).

/// One destination's room: `None` when it is not to be used (unreachable, refused, or
/// failed too often), else the bytes still free on it.
pub type Room = Option<u64>;

/// The plan for a set of guests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement<K> {
    /// In the order to migrate them (largest first): each guest with the index of its
    /// destination.
    pub assigned: Vec<(K, usize)>,
    /// Guests no destination has room for, largest first.
    pub unplaced: Vec<K>,
    /// Each destination's room once the assigned guests are on it.
    pub left: Vec<Room>,
}

/// Places `guests` (each a key and the bytes it needs) on destinations with `room`.
/// Ties go to the larger guest's key order, then to the earlier destination.
pub fn place<K: Clone + Ord>(guests: &[(K, u64)], room: &[Room]) -> Placement<K> {
    let mut order: Vec<&(K, u64)> = guests.iter().collect();
    order.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    let mut left = room.to_vec();
    let mut assigned = Vec::new();
    let mut unplaced = Vec::new();
    for (key, bytes) in order {
        match take(*bytes, &mut left) {
            Some(d) => assigned.push((key.clone(), d)),
            None => unplaced.push(key.clone()),
        }
    }
    Placement {
        assigned,
        unplaced,
        left,
    }
}

/// Picks the destination with the most room that fits `bytes` (the earliest on a tie)
/// and takes the bytes from its room.
pub fn take(bytes: u64, room: &mut [Room]) -> Option<usize> {
    let mut best: Option<(usize, u64)> = None;
    for (i, r) in room.iter().enumerate() {
        if let Some(free) = *r {
            if free >= bytes && best.is_none_or(|(_, b)| free > b) {
                best = Some((i, free));
            }
        }
    }
    let (i, free) = best?;
    room[i] = Some(free - bytes);
    Some(i)
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: u64 = 1 << 30;

    #[test]
    fn the_largest_guest_goes_first_to_the_destination_with_the_most_room() {
        let guests = [("small", G), ("big", 4 * G), ("mid", 2 * G)];
        let p = place(&guests, &[Some(5 * G), Some(4 * G)]);
        // big → 0 (5 left 1), mid → 1 (4 left 2), small → 1 (2 left 1).
        assert_eq!(p.assigned, vec![("big", 0), ("mid", 1), ("small", 1)]);
        assert!(p.unplaced.is_empty());
        assert_eq!(p.left, vec![Some(G), Some(G)]);
    }

    #[test]
    fn a_guest_that_fits_nowhere_is_left_out_and_the_rest_still_placed() {
        let guests = [("huge", 10 * G), ("a", G), ("b", G)];
        let p = place(&guests, &[Some(3 * G), Some(2 * G)]);
        assert_eq!(p.unplaced, vec!["huge"]);
        assert_eq!(p.assigned, vec![("a", 0), ("b", 0)]);
        assert_eq!(p.left, vec![Some(G), Some(2 * G)]);
    }

    #[test]
    fn destinations_that_cannot_be_used_get_nothing() {
        let guests = [("a", G), ("b", G)];
        let p = place(&guests, &[None, Some(8 * G), None]);
        assert_eq!(p.assigned, vec![("a", 1), ("b", 1)]);
        let p = place(&guests, &[None, None]);
        assert_eq!(p.unplaced, vec!["a", "b"]);
        assert!(p.assigned.is_empty());
    }

    #[test]
    fn equal_guests_alternate_between_equal_destinations_in_name_order() {
        let guests = [("g3", G), ("g1", G), ("g2", G)];
        let p = place(&guests, &[Some(8 * G), Some(8 * G)]);
        assert_eq!(p.assigned, vec![("g1", 0), ("g2", 1), ("g3", 0)]);
    }

    #[test]
    fn a_guest_fits_a_room_of_exactly_its_size() {
        let mut room = [Some(G)];
        assert_eq!(take(G, &mut room), Some(0));
        assert_eq!(room, [Some(0)]);
        assert_eq!(take(1, &mut room), None);
    }
}
