import Foundation
import KubeObjects
import KubernetesAPI

/// Where Services and EndpointSlices come from: files (`-f`, `-` for stdin) or the Kubernetes API.
public enum ObjectSource: Sendable {
    case files([String])
    case api(KubernetesSourceOptions)
}

/// The first stage of the pipeline: reads every input into one `ClusterObjects`. Strict: the first bad
/// object stops the one-shot commands with exit 65 naming file, object and field (the agent is lenient
/// instead, see `SyncAgent`).
public enum ObjectLoading {
    public static func load(_ source: ObjectSource) async throws(PipelineError) -> ClusterObjects {
        switch source {
        case .api(let options):
            do { return try await KubernetesSource.load(options) } catch {
                throw PipelineError(code: error.exitCode, error.description)
            }
        case .files(let names):
            return try loadFiles(names)
        }
    }

    public static func loadFiles(_ names: [String]) throws(PipelineError) -> ClusterObjects {
        var objects = ClusterObjects()
        var readStdin = false
        for name in names {
            let bytes: [UInt8]
            if name == "-" {
                if readStdin { throw PipelineError(.usage, "-f - given more than once: standard input can be read only once") }
                readStdin = true
                bytes = try readAll(fd: 0, name: "<stdin>")
            } else {
                let fd = open(name, O_RDONLY | O_CLOEXEC)
                guard fd >= 0 else {
                    var isDir: ObjCBool = false
                    if FileManager.default.fileExists(atPath: name, isDirectory: &isDir) {
                        throw PipelineError(.noInput, "\(name): cannot read \(isDir.boolValue ? "a directory" : "the file (permission denied?)")")
                    }
                    throw PipelineError(.noInput, "\(name): no such file")
                }
                defer { close(fd) }
                bytes = try readAll(fd: fd, name: name)
            }
            do {
                try DocumentLoader.load(bytes, source: name == "-" ? "<stdin>" : name, into: &objects)
            } catch {
                throw PipelineError(.dataError, error.description)
            }
        }
        return objects
    }

    /// Reads a whole file or pipe straight into one buffer (inputs can be hundreds of megabytes; no copies).
    static func readAll(fd: Int32, name: String) throws(PipelineError) -> [UInt8] {
        var st = stat()
        var capacity = 1 << 16
        if fstat(fd, &st) == 0, (st.st_mode & S_IFMT) == S_IFREG { capacity = Int(st.st_size) + 1 }
        var buffer = [UInt8](repeating: 0, count: capacity)
        var used = 0
        while true {
            if used == buffer.count { buffer.append(contentsOf: repeatElement(0, count: buffer.count)) }
            let n = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress! + used, $0.count - used) }
            if n < 0 {
                if errno == EINTR { continue }
                if errno == EISDIR { throw PipelineError(.noInput, "\(name): is a directory") }
                throw PipelineError(.noInput, "\(name): cannot read (\(String(cString: strerror(errno))))")
            }
            if n == 0 { break }
            used += n
        }
        buffer.removeSubrange(used...)
        return buffer
    }
}
