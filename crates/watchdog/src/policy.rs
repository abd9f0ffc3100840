//! Supervision as a pure state machine: the watchdog's loop feeds it events
//! (the dispatcher spawned, exited, missed heartbeats, a stop was asked) and
//! carries out the actions it returns. No I/O, no clock: time comes in with
//! each event, so every transition is tested without processes.
//!
//! States and transitions:
//!
//! | state    | event                      | next state | actions                         |
//! |----------|----------------------------|------------|---------------------------------|
//! | Starting | Spawned(pid)               | Running    | —                               |
//! | Starting | SpawnFailed                | Backoff / GaveUp | ScheduleRestart / Exit(1) |
//! | Running  | Hung                       | Running    | Kill(pid) (exit follows)        |
//! | Running  | Exited                     | Backoff / GaveUp | ScheduleRestart / Exit(1) |
//! | Running  | StopRequested              | Stopping   | Terminate(pid)                  |
//! | Backoff  | BackoffElapsed             | Starting   | Spawn                           |
//! | Backoff  | StopRequested              | Stopped    | Exit(0)                         |
//! | Stopping | GraceExpired               | Stopping   | Kill(pid)                       |
//! | Stopping | Exited                     | Stopped    | Exit(0)                         |
//! | Stopped, GaveUp | anything            | same       | —                               |
//!
//! Any other pair is ignored (e.g. a late heartbeat miss while stopping).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Limits on restarts: backoff and intensity (at most `max_restarts` within
/// `within`, as an OTP supervisor).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestartPolicy {
    /// Restarts allowed inside the window; one more exit gives up.
    pub max_restarts: u32,
    /// The window.
    pub within: Duration,
    /// First backoff delay (small, so a crash costs little).
    pub first_delay: Duration,
    /// Backoff cap.
    pub max_delay: Duration,
    /// A dispatcher up at least this long resets the backoff to `first_delay`.
    pub stable_after: Duration,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        RestartPolicy {
            max_restarts: 5,
            within: Duration::from_secs(10),
            first_delay: Duration::from_millis(10),
            max_delay: Duration::from_secs(2),
            stable_after: Duration::from_secs(5),
        }
    }
}

/// Where supervision stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// A spawn is under way.
    Starting,
    /// The dispatcher runs.
    Running,
    /// Waiting before the next spawn.
    Backoff,
    /// SIGTERM sent; waiting for the dispatcher to exit.
    Stopping,
    /// Done after a stop request.
    Stopped,
    /// Done after too many restarts.
    GaveUp,
}

/// What happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The dispatcher process was started.
    Spawned { pid: u32 },
    /// It could not be started.
    SpawnFailed { error: String },
    /// Its heartbeat went unanswered too many times.
    Hung { misses: u32 },
    /// It exited (reaped), with a description of how.
    Exited { pid: u32, how: String },
    /// The backoff delay is over.
    BackoffElapsed,
    /// SIGTERM or SIGINT reached the watchdog.
    StopRequested,
    /// The dispatcher did not stop within the grace period.
    GraceExpired,
}

/// What the loop must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Start the dispatcher.
    Spawn,
    /// SIGKILL it.
    Kill { pid: u32 },
    /// SIGTERM it and arm the grace timer.
    Terminate { pid: u32 },
    /// Wait `delay`, then send [`Event::BackoffElapsed`].
    ScheduleRestart { delay: Duration, cause: String },
    /// Exit the watchdog with `code`, saying `message`.
    Exit { code: u8, message: String },
}

/// The supervisor of one dispatcher.
#[derive(Debug)]
pub struct Supervisor {
    policy: RestartPolicy,
    state: State,
    pid: Option<u32>,
    started_at: Option<Instant>,
    /// Why the current process is being killed, if we are killing it.
    killing_for: Option<String>,
    recent: VecDeque<Instant>,
    next_delay: Duration,
    restarts: u64,
    last_cause: Option<String>,
}

impl Supervisor {
    /// A supervisor about to start its first dispatcher: call [`Supervisor::start`].
    pub fn new(policy: RestartPolicy) -> Self {
        let next_delay = policy.first_delay;
        Supervisor {
            policy,
            state: State::Starting,
            pid: None,
            started_at: None,
            killing_for: None,
            recent: VecDeque::new(),
            next_delay,
            restarts: 0,
            last_cause: None,
        }
    }

    /// The first action.
    pub fn start(&mut self) -> Vec<Action> {
        self.state = State::Starting;
        vec![Action::Spawn]
    }

    /// Current state.
    pub fn state(&self) -> State {
        self.state
    }

    /// The live dispatcher's pid.
    pub fn pid(&self) -> Option<u32> {
        self.pid
    }

    /// Restarts so far.
    pub fn restarts(&self) -> u64 {
        self.restarts
    }

    /// Why the last restart happened.
    pub fn last_cause(&self) -> Option<&str> {
        self.last_cause.as_deref()
    }

    /// Feeds one event that happened at `now`; returns the actions to carry out.
    pub fn handle(&mut self, event: Event, now: Instant) -> Vec<Action> {
        use State::*;
        match (self.state, event) {
            (Starting, Event::Spawned { pid }) => {
                self.state = Running;
                self.pid = Some(pid);
                self.started_at = Some(now);
                self.killing_for = None;
                vec![]
            }
            (Starting, Event::SpawnFailed { error }) => {
                self.after_exit(format!("could not start: {error}"), now)
            }
            (Running, Event::Hung { misses }) => match self.pid {
                Some(pid) if self.killing_for.is_none() => {
                    self.killing_for = Some(format!("hang ({misses} heartbeats missed)"));
                    vec![Action::Kill { pid }]
                }
                _ => vec![],
            },
            (Running, Event::Exited { pid, how }) if Some(pid) == self.pid => {
                let cause = match self.killing_for.take() {
                    Some(why) => format!("{why}; {how}"),
                    None => format!("crash: {how}"),
                };
                self.after_exit(cause, now)
            }
            (Running, Event::StopRequested) => {
                self.state = Stopping;
                match self.pid {
                    Some(pid) => vec![Action::Terminate { pid }],
                    None => self.stopped(),
                }
            }
            (Backoff, Event::BackoffElapsed) => {
                self.state = Starting;
                vec![Action::Spawn]
            }
            (Backoff | Starting, Event::StopRequested) => self.stopped(),
            (Stopping, Event::GraceExpired) => self
                .pid
                .map(|pid| vec![Action::Kill { pid }])
                .unwrap_or_default(),
            (Stopping, Event::Exited { pid, .. }) if Some(pid) == self.pid => self.stopped(),
            _ => vec![],
        }
    }

    fn stopped(&mut self) -> Vec<Action> {
        self.state = State::Stopped;
        self.pid = None;
        vec![Action::Exit {
            code: 0,
            message: "stopped".into(),
        }]
    }

    /// The dispatcher is gone unexpectedly: restart with backoff, or give up.
    fn after_exit(&mut self, cause: String, now: Instant) -> Vec<Action> {
        let uptime = self
            .started_at
            .map(|t| now.saturating_duration_since(t))
            .unwrap_or_default();
        self.pid = None;
        self.started_at = None;
        while self
            .recent
            .front()
            .is_some_and(|&t| now.saturating_duration_since(t) > self.policy.within)
        {
            self.recent.pop_front();
        }
        if self.recent.len() as u32 >= self.policy.max_restarts {
            self.state = State::GaveUp;
            let message = format!(
                "giving up: the dispatcher needed more than {} restarts within {:?} (last cause: {cause})",
                self.policy.max_restarts, self.policy.within
            );
            return vec![Action::Exit { code: 1, message }];
        }
        if uptime >= self.policy.stable_after {
            self.next_delay = self.policy.first_delay;
        }
        let delay = self.next_delay;
        self.next_delay = (delay * 2).min(self.policy.max_delay);
        self.recent.push_back(now);
        self.restarts += 1;
        self.last_cause = Some(cause.clone());
        self.state = State::Backoff;
        vec![Action::ScheduleRestart { delay, cause }]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn policy() -> RestartPolicy {
        RestartPolicy {
            max_restarts: 3,
            within: ms(10_000),
            first_delay: ms(10),
            max_delay: ms(50),
            stable_after: ms(5_000),
        }
    }

    fn running(t0: Instant) -> Supervisor {
        let mut s = Supervisor::new(policy());
        assert_eq!(s.start(), vec![Action::Spawn]);
        assert_eq!(s.handle(Event::Spawned { pid: 10 }, t0), vec![]);
        s
    }

    /// A supervisor set up for a case.
    type Setup = fn(Instant) -> Supervisor;
    /// (name, setup, event, expected state, expected action kinds)
    type Case = (&'static str, Setup, Event, State, Vec<&'static str>);

    fn exited(pid: u32, how: &str) -> Event {
        Event::Exited {
            pid,
            how: how.into(),
        }
    }

    /// Running, then its dispatcher crashed: in backoff.
    fn in_backoff(t: Instant) -> Supervisor {
        let mut s = running(t);
        s.handle(exited(10, "x"), t);
        s
    }

    /// Running, then asked to stop: stopping.
    fn stopping(t: Instant) -> Supervisor {
        let mut s = running(t);
        s.handle(Event::StopRequested, t);
        s
    }

    /// Runs each case: its set-up, then its event; checks the state reached
    /// and the kinds of the actions returned.
    fn check_transitions(cases: Vec<Case>) {
        let t0 = Instant::now();
        for (name, setup, event, state, kinds) in cases {
            let mut s = setup(t0);
            let actions = s.handle(event, t0 + ms(1));
            let got: Vec<String> = actions
                .iter()
                .map(|a| {
                    format!("{a:?}")
                        .split([' ', '{'])
                        .next()
                        .unwrap()
                        .to_owned()
                })
                .collect();
            assert_eq!(s.state(), state, "{name}");
            assert_eq!(got, kinds, "{name}");
        }
    }

    #[test]
    fn transitions_while_running() {
        check_transitions(vec![
            (
                "crash restarts",
                running,
                exited(10, "signal 9"),
                State::Backoff,
                vec!["ScheduleRestart"],
            ),
            (
                "stale exit ignored",
                running,
                exited(99, "x"),
                State::Running,
                vec![],
            ),
            (
                "hang kills",
                running,
                Event::Hung { misses: 3 },
                State::Running,
                vec!["Kill"],
            ),
            (
                "stop terminates",
                running,
                Event::StopRequested,
                State::Stopping,
                vec!["Terminate"],
            ),
            (
                "late backoff ignored",
                running,
                Event::BackoffElapsed,
                State::Running,
                vec![],
            ),
            (
                "grace ignored when running",
                running,
                Event::GraceExpired,
                State::Running,
                vec![],
            ),
        ]);
    }

    #[test]
    fn transitions_in_backoff() {
        check_transitions(vec![
            (
                "stop during backoff exits at once",
                in_backoff,
                Event::StopRequested,
                State::Stopped,
                vec!["Exit"],
            ),
            (
                "backoff elapsed spawns",
                in_backoff,
                Event::BackoffElapsed,
                State::Starting,
                vec!["Spawn"],
            ),
        ]);
    }

    #[test]
    fn transitions_while_stopping() {
        check_transitions(vec![
            (
                "grace expired kills",
                stopping,
                Event::GraceExpired,
                State::Stopping,
                vec!["Kill"],
            ),
            (
                "exit while stopping ends",
                stopping,
                exited(10, "exit 0"),
                State::Stopped,
                vec!["Exit"],
            ),
            (
                "hang while stopping ignored",
                stopping,
                Event::Hung { misses: 3 },
                State::Stopping,
                vec![],
            ),
        ]);
    }

    #[test]
    fn a_hang_is_killed_once_and_its_exit_is_recorded_as_a_hang() {
        let t0 = Instant::now();
        let mut s = running(t0);
        assert_eq!(
            s.handle(Event::Hung { misses: 3 }, t0),
            vec![Action::Kill { pid: 10 }]
        );
        assert_eq!(
            s.handle(Event::Hung { misses: 4 }, t0),
            vec![],
            "no second kill"
        );
        let a = s.handle(
            Event::Exited {
                pid: 10,
                how: "killed by signal 9".into(),
            },
            t0,
        );
        assert!(
            matches!(&a[..], [Action::ScheduleRestart { cause, .. }] if cause.starts_with("hang (3 heartbeats missed)"))
        );
        assert_eq!(s.restarts(), 1);
        assert!(s.last_cause().unwrap().contains("hang"));
    }

    #[test]
    fn backoff_doubles_to_its_cap_and_resets_after_a_stable_run() {
        let t0 = Instant::now();
        let mut s = running(t0);
        let mut delays = Vec::new();
        let mut t = t0;
        for i in 0..3u32 {
            t += ms(100);
            match &s.handle(
                Event::Exited {
                    pid: 10 + i,
                    how: "x".into(),
                },
                t,
            )[..]
            {
                [Action::ScheduleRestart { delay, .. }] => delays.push(*delay),
                other => panic!("{other:?}"),
            }
            s.handle(Event::BackoffElapsed, t);
            s.handle(Event::Spawned { pid: 11 + i }, t);
        }
        assert_eq!(delays, vec![ms(10), ms(20), ms(40)]);
        // Up for longer than stable_after, and outside the intensity window: back to the first delay.
        t += ms(20_000);
        match &s.handle(
            Event::Exited {
                pid: 13,
                how: "x".into(),
            },
            t,
        )[..]
        {
            [Action::ScheduleRestart { delay, .. }] => assert_eq!(*delay, ms(10)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn more_than_r_restarts_within_t_gives_up_with_a_clear_message() {
        let t0 = Instant::now();
        let mut s = Supervisor::new(policy());
        s.start();
        let mut t = t0;
        for pid in 1..=3 {
            s.handle(Event::Spawned { pid }, t);
            let a = s.handle(
                Event::Exited {
                    pid,
                    how: "exit status 2".into(),
                },
                t,
            );
            assert!(
                matches!(&a[..], [Action::ScheduleRestart { .. }]),
                "restart {pid}"
            );
            t += ms(10);
            s.handle(Event::BackoffElapsed, t);
        }
        s.handle(Event::Spawned { pid: 4 }, t);
        let a = s.handle(
            Event::Exited {
                pid: 4,
                how: "exit status 2".into(),
            },
            t,
        );
        match &a[..] {
            [Action::Exit { code: 1, message }] => {
                assert!(
                    message.contains("giving up")
                        && message.contains("3 restarts")
                        && message.contains("exit status 2"),
                    "{message}"
                )
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(s.state(), State::GaveUp);
        assert_eq!(s.restarts(), 3);
        assert_eq!(
            s.handle(Event::BackoffElapsed, t),
            vec![],
            "nothing after giving up"
        );
    }

    #[test]
    fn restarts_spread_beyond_the_window_never_give_up() {
        let t0 = Instant::now();
        let mut s = Supervisor::new(policy());
        s.start();
        for i in 0..20u32 {
            let t = t0 + ms(4_000 * i as u64);
            s.handle(Event::Spawned { pid: i }, t);
            let a = s.handle(
                Event::Exited {
                    pid: i,
                    how: "x".into(),
                },
                t + ms(1),
            );
            assert!(
                matches!(&a[..], [Action::ScheduleRestart { .. }]),
                "exit {i}: {a:?}"
            );
            s.handle(Event::BackoffElapsed, t + ms(2));
        }
    }

    #[test]
    fn a_failed_spawn_counts_as_an_exit() {
        let mut s = Supervisor::new(policy());
        s.start();
        let a = s.handle(
            Event::SpawnFailed {
                error: "no such file".into(),
            },
            Instant::now(),
        );
        assert!(
            matches!(&a[..], [Action::ScheduleRestart { cause, .. }] if cause.contains("no such file"))
        );
    }
}
