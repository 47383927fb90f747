//! fio's job ordering and reporting groups: `stonewall` splits the jobs into phases that run
//! one after another, `stonewall` and `new_group` start reporting groups (`groupid`), and
//! `group_reporting` merges a group's results into one. Runs nothing itself.

use std::ops::Range;

use super::error::OptionError;
use super::report::{merge_jobs, JobResult};
use super::spec::JobSpec;

/// Sets every job's `groupid` as fio does: a job with `stonewall` or `new_group` starts a new
/// group, unless no job is in the current group yet (a leading `stonewall` stays in group 0).
pub fn assign_groups(jobs: &mut [JobSpec]) {
    let mut groupid = 0;
    let mut jobs_in_group = 0u32;
    for job in jobs {
        if (job.stonewall || job.new_group) && jobs_in_group > 0 {
            groupid += 1;
            jobs_in_group = 0;
        }
        job.groupid = groupid;
        jobs_in_group += 1;
    }
}

/// fio's rule for `wait_for`: the job waited for must be defined before the waiting one.
pub fn check_wait_for(jobs: &[JobSpec]) -> Result<(), OptionError> {
    for (index, job) in jobs.iter().enumerate() {
        let Some(name) = &job.wait_for else { continue };
        if !jobs[..index].iter().any(|earlier| &earlier.name == name) {
            return Err(OptionError::InvalidJob {
                job: job.name.clone(),
                option: "wait_for".to_string(),
                value: name.clone(),
                reason: "no job of that name is defined before this one".to_string(),
            });
        }
    }
    Ok(())
}

/// Index ranges of jobs that run together: each `stonewall` job (after the first job) waits
/// for every job before it, so it starts the next phase.
pub fn run_phases(jobs: &[JobSpec]) -> Vec<Range<usize>> {
    let mut phases = Vec::new();
    let mut start = 0;
    for (index, job) in jobs.iter().enumerate().skip(1) {
        if job.stonewall {
            phases.push(start..index);
            start = index;
        }
    }
    if start < jobs.len() {
        phases.push(start..jobs.len());
    }
    debug_assert_eq!(phases.iter().map(|phase| phase.len()).sum::<usize>(), jobs.len());
    phases
}

/// fio's report entries: a result with `group_reporting` is merged into the entry before it
/// when that one also has `group_reporting` and the same `groupid`; every other result stands
/// alone. The results must be in job order (clones next to each other), as the runner returns.
pub fn report_entries(results: Vec<JobResult>) -> Vec<JobResult> {
    let mut entries: Vec<Vec<JobResult>> = Vec::new();
    for result in results {
        let joins = entries.last().and_then(|entry| entry.last()).is_some_and(|last| {
            result.spec.group_reporting && last.spec.group_reporting && last.spec.groupid == result.spec.groupid
        });
        match (joins, entries.last_mut()) {
            (true, Some(entry)) => entry.push(result),
            _ => entries.push(vec![result]),
        }
    }
    entries
        .into_iter()
        .map(|mut entry| match entry.len() {
            1 => entry.pop().expect("one result"),
            _ => merge_jobs(&entry),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(name: &str, stonewall: bool, new_group: bool) -> JobSpec {
        JobSpec { stonewall, new_group, ..JobSpec::new(name) }
    }

    /// The ids real fio 3.33 prints for: [a] stonewall, [b] new_group, [c], [d] stonewall, [e], [f] new_group.
    #[test]
    fn groups_match_fio() {
        let mut jobs = vec![
            job("a", true, false),
            job("b", false, true),
            job("c", false, false),
            job("d", true, false),
            job("e", false, false),
            job("f", false, true),
        ];
        assign_groups(&mut jobs);
        let ids: Vec<u32> = jobs.iter().map(|job| job.groupid).collect();
        assert_eq!(ids, [0, 1, 1, 2, 2, 3]);
        assert_eq!(run_phases(&jobs), [0..3, 3..6]);
        assert!(run_phases(&[]).is_empty());
    }

    #[test]
    fn wait_for_names_an_earlier_job() {
        let waiter = JobSpec { wait_for: Some("writer".into()), ..JobSpec::new("reader") };
        assert_eq!(check_wait_for(&[JobSpec::new("writer"), waiter.clone()]), Ok(()));
        let err = check_wait_for(&[waiter, JobSpec::new("writer")]).unwrap_err();
        assert!(
            matches!(err, OptionError::InvalidJob { ref option, ref value, .. } if option == "wait_for" && value == "writer")
        );
    }

    #[test]
    fn group_reporting_merges_within_a_group_only() {
        let mut specs = vec![job("a", false, false), job("b", false, false), job("c", false, true)];
        for spec in &mut specs {
            spec.group_reporting = true;
        }
        specs[0].numjobs = 2;
        assign_groups(&mut specs);
        let results = vec![
            JobResult::new(specs[0].clone(), 0),
            JobResult::new(specs[0].clone(), 1),
            JobResult::new(specs[1].clone(), 0),
            JobResult::new(specs[2].clone(), 0),
        ];
        let entries = report_entries(results);
        let names: Vec<(&str, u32)> = entries.iter().map(|e| (e.spec.name.as_str(), e.spec.groupid)).collect();
        assert_eq!(names, [("a", 0), ("c", 1)]);
        let plain = vec![JobResult::new(JobSpec::new("x"), 0), JobResult::new(JobSpec::new("x"), 1)];
        assert_eq!(report_entries(plain).len(), 2);
    }
}
