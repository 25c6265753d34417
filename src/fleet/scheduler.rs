//! Which host starts next: a sliding window of `--parallel` hosts, in inventory
//! order, that stops starting hosts once `--max-fail` of them have failed. Pure state,
//! no I/O, so that it can be tested against a model with outcomes in any order.

use std::collections::{BTreeSet, VecDeque};

/// `--max-fail K` or `--max-fail P%`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FailLimit {
    Hosts(usize),
    Percent(u32),
}

impl FailLimit {
    pub fn parse(text: &str) -> Result<FailLimit, String> {
        let bad = || {
            format!("`{text}` is not a failure limit: give a count (`1`) or a percentage (`25%`)")
        };
        match text.strip_suffix('%') {
            Some(p) => match p.parse::<u32>() {
                Ok(p) if (1..=100).contains(&p) => Ok(FailLimit::Percent(p)),
                _ => Err(bad()),
            },
            None => match text.parse::<usize>() {
                Ok(k) if k >= 1 => Ok(FailLimit::Hosts(k)),
                _ => Err(bad()),
            },
        }
    }

    /// The number of failed hosts, out of `total`, at which no more are started:
    /// P% of 10 hosts is reached at ceil(P/10) failures (25% of 10: at 3).
    pub fn threshold(self, total: usize) -> usize {
        match self {
            FailLimit::Hosts(k) => k,
            FailLimit::Percent(p) => (total * p as usize).div_ceil(100).max(1),
        }
    }

    pub fn text(self) -> String {
        match self {
            FailLimit::Hosts(k) => k.to_string(),
            FailLimit::Percent(p) => format!("{p}%"),
        }
    }
}

#[derive(Debug)]
pub struct Scheduler {
    waiting: VecDeque<usize>,
    running: BTreeSet<usize>,
    parallel: usize,
    /// Failures at which starting stops (`usize::MAX`: no limit).
    threshold: usize,
    failed: usize,
    finished: usize,
    total: usize,
}

impl Scheduler {
    /// `hosts`: indices in the order they are to start.
    pub fn new(hosts: Vec<usize>, parallel: usize, limit: Option<FailLimit>) -> Scheduler {
        let total = hosts.len();
        Scheduler {
            waiting: hosts.into(),
            running: BTreeSet::new(),
            parallel: parallel.max(1),
            threshold: limit.map_or(usize::MAX, |l| l.threshold(total)),
            failed: 0,
            finished: 0,
            total,
        }
    }

    /// Whether the failure limit stopped the starting of hosts.
    pub fn stopped(&self) -> bool {
        self.failed >= self.threshold
    }

    /// The next host to start now, if the window has room and the limit allows.
    pub fn start_next(&mut self) -> Option<usize> {
        if self.stopped() || self.running.len() >= self.parallel {
            return None;
        }
        let host = self.waiting.pop_front()?;
        self.running.insert(host);
        Some(host)
    }

    /// A started host ended; `ok` is false for every status but `succeeded`.
    pub fn finish(&mut self, host: usize, ok: bool) {
        assert!(self.running.remove(&host), "host {host} was not running");
        self.finished += 1;
        if !ok {
            self.failed += 1;
        }
    }

    pub fn running(&self) -> usize {
        self.running.len()
    }

    /// Nothing runs and nothing more will start.
    pub fn done(&self) -> bool {
        self.running.is_empty() && (self.waiting.is_empty() || self.stopped())
    }

    /// The hosts that will never start in this attempt (the limit stopped them).
    pub fn not_started(&self) -> Vec<usize> {
        if self.done() {
            self.waiting.iter().copied().collect()
        } else {
            Vec::new()
        }
    }

    pub fn total(&self) -> usize {
        self.total
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The model: the window and limit written as plainly as possible, over the same
    /// sequence of choices (which running host ends next, and how).
    fn model(
        n: usize,
        parallel: usize,
        threshold: usize,
        choices: &[(usize, bool)],
    ) -> (Vec<usize>, Vec<usize>) {
        let mut started = Vec::new();
        let mut running: Vec<usize> = Vec::new();
        let mut failed = 0;
        let mut next = 0;
        let mut choices = choices.iter().cycle();
        loop {
            while failed < threshold && running.len() < parallel.max(1) && next < n {
                started.push(next);
                running.push(next);
                next += 1;
            }
            if running.is_empty() {
                break;
            }
            let &(pick, ok) = choices.next().unwrap();
            running.sort();
            running.remove(pick % running.len());
            if !ok {
                failed += 1;
            }
        }
        (started, (next..n).collect())
    }

    proptest! {
        #[test]
        fn scheduler_matches_the_model(
            n in 0usize..12,
            parallel in 0usize..5,
            limit in proptest::option::of(prop_oneof![
                (1usize..6).prop_map(FailLimit::Hosts),
                (1u32..=100).prop_map(FailLimit::Percent),
            ]),
            choices in proptest::collection::vec((0usize..8, any::<bool>()), 1..40),
        ) {
            let threshold = limit.map_or(usize::MAX, |l| l.threshold(n));
            let (want_started, want_not_started) = model(n, parallel, threshold, &choices);
            let mut s = Scheduler::new((0..n).collect(), parallel, limit);
            let mut started = Vec::new();
            let mut running: Vec<usize> = Vec::new();
            let mut choices = choices.iter().cycle();
            let mut failed = 0;
            loop {
                while let Some(h) = s.start_next() {
                    // Never more than the window, never after the limit.
                    prop_assert!(s.running() <= parallel.max(1));
                    prop_assert!(failed < threshold);
                    started.push(h);
                    running.push(h);
                }
                if s.done() {
                    break;
                }
                prop_assert!(!running.is_empty(), "not done, but nothing runs");
                let &(pick, ok) = choices.next().unwrap();
                running.sort();
                let host = running.remove(pick % running.len());
                s.finish(host, ok);
                failed += usize::from(!ok);
            }
            prop_assert!(running.is_empty());
            prop_assert_eq!(&started, &want_started);
            prop_assert_eq!(s.not_started(), want_not_started.clone());
            // Every host either started or is reported not started; none is lost.
            prop_assert_eq!(started.len() + want_not_started.len(), n);
            // Hosts are left out only when the limit was reached.
            if !want_not_started.is_empty() {
                prop_assert!(failed >= threshold);
            }
        }
    }

    #[test]
    fn percent_thresholds() {
        assert_eq!(FailLimit::Percent(25).threshold(10), 3);
        assert_eq!(FailLimit::Percent(50).threshold(3), 2);
        assert_eq!(FailLimit::Percent(1).threshold(3), 1);
        assert_eq!(
            FailLimit::parse("0"),
            Err("`0` is not a failure limit: give a count (`1`) or a percentage (`25%`)".into())
        );
        assert!(FailLimit::parse("101%").is_err());
        assert_eq!(FailLimit::parse("2"), Ok(FailLimit::Hosts(2)));
    }
}
