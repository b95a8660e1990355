//! convoy's fault-injection suite, in the spirit of Jepsen: real `convoy node` processes in a
//! private network namespace ([`db`]), faults ([`nemesis`], [`lossyfs`]), a client workload
//! ([`workload`]) recorded as a Jepsen-format [`history`], a [`checker`] for every promise,
//! and a [`report`] with plots. See `jepsen/README.md`.

pub mod checker;
pub mod db;
pub mod history;
pub mod lossyfs;
pub mod nemesis;
pub mod recorder;
pub mod report;
pub mod run;
pub mod workload;
