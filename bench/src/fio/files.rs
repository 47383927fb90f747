//! Which files a job clone does I/O against, as fio names them: the `filename` list
//! (`a:b:c`), relative names under `directory`, generated names `JOB.CLONE.FILE` when no
//! filename is given, or the rbd image of `pool`/`rbdname`. Opens nothing itself.

use super::spec::JobSpec;
use super::values::{split_filenames, Engine};

/// One file of a job clone: its path (or rbd spec) and the bytes of it the clone uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobFile {
    pub path: String,
    /// The job's `size` split evenly over its files (fio's rule); `None`: the file's size.
    pub size_bytes: Option<u64>,
}

/// The files of clone `clone_index` of `job`; empty for the null engine (no file).
/// Clones share named files; generated names are per clone, as in fio.
pub fn job_files(job: &JobSpec, clone_index: u32) -> Vec<JobFile> {
    let paths = match (job.engine(), &job.filename) {
        (Engine::Null, _) => return Vec::new(),
        (_, Some(list)) => split_filenames(list).into_iter().map(|name| under_directory(job, &name)).collect(),
        (Engine::Rbd, None) => vec![rbd_name(job)],
        (Engine::Nbd, None) => job.nbd_uri.iter().cloned().collect(),
        (_, None) => (0..job.nrfiles)
            .map(|file_index| under_directory(job, &format!("{}.{clone_index}.{file_index}", job.name)))
            .collect::<Vec<_>>(),
    };
    let count = paths.len().max(1) as u64;
    let size_bytes = job.filesize_bytes.or(job.size_bytes.map(|size| size / count));
    paths.into_iter().map(|path| JobFile { path, size_bytes }).collect()
}

/// `directory=` prefixes relative names; absolute paths, rbd specs and NBD URIs stay as written.
fn under_directory(job: &JobSpec, name: &str) -> String {
    match &job.directory {
        Some(directory)
            if !name.starts_with('/') && !name.starts_with("rbd:") && !tandem_drivers::nbd::is_nbd_uri(name) =>
        {
            format!("{}/{name}", directory.trim_end_matches('/'))
        }
        _ => name.to_string(),
    }
}

/// fio's rbd engine options in QEMU's spelling, which our rbd driver parses.
fn rbd_name(job: &JobSpec) -> String {
    let (pool, image) = (job.rbd_pool.as_deref().unwrap_or("rbd"), job.rbd_image.as_deref().unwrap_or(""));
    match &job.rbd_client {
        Some(client) => format!("rbd:{pool}/{image}:id={client}"),
        None => format!("rbd:{pool}/{image}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_fio() {
        let mut job = JobSpec { size_bytes: Some(8 << 20), nrfiles: 2, ..JobSpec::new("seq") };
        job.directory = Some("/data/".into());
        let generated: Vec<String> = job_files(&job, 3).into_iter().map(|file| file.path).collect();
        assert_eq!(generated, ["/data/seq.3.0", "/data/seq.3.1"]);
        assert_eq!(job_files(&job, 0)[0].size_bytes, Some(4 << 20));
        job.filesize_bytes = Some(1 << 20);
        assert_eq!(job_files(&job, 0)[1].size_bytes, Some(1 << 20));
        job.filename = Some("a:/abs/b".into());
        let named: Vec<String> = job_files(&job, 3).into_iter().map(|file| file.path).collect();
        assert_eq!(named, ["/data/a", "/abs/b"]);
        job.ioengine = Some("null".into());
        assert!(job_files(&job, 0).is_empty());
    }

    #[test]
    fn rbd_options_make_an_rbd_name() {
        let job = JobSpec {
            ioengine: Some("rbd".into()),
            rbd_pool: Some("rbd".into()),
            rbd_image: Some("fio_test".into()),
            rbd_client: Some("admin".into()),
            ..JobSpec::new("r")
        };
        assert_eq!(job_files(&job, 0)[0].path, "rbd:rbd/fio_test:id=admin");
    }
}
