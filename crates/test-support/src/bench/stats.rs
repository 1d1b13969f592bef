//! Figures of a sample.

/// The `p` percentile (0–1) of an ascending `sorted` sample: the element at `len × p`, the last
/// one for `p` = 1; None for an empty sample.
pub fn percentile<T: Copy>(sorted: &[T], p: f64) -> Option<T> {
    let last = sorted.len().checked_sub(1)?;
    sorted
        .get(((sorted.len() as f64 * p) as usize).min(last))
        .copied()
}

#[cfg(test)]
mod tests {
    use super::percentile;

    #[test]
    fn picks_by_rank_and_clamps() {
        let v: Vec<u32> = (1..=100).collect();
        assert_eq!(percentile(&v, 0.5), Some(51));
        assert_eq!(percentile(&v, 0.99), Some(100));
        assert_eq!(percentile(&v, 1.0), Some(100));
        assert_eq!(percentile::<u32>(&[], 0.5), None);
    }
}
