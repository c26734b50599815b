import ArgumentParser
import Foundation
import KubeObjects
import RulePlanning
import ServiceResolution

/// source → resolution → plan; the only place the CLI reads input.
enum Pipeline {
    static func loadObjects(_ source: SourceOptions, namespaces: [String], selector: String?) async throws(CLIError) -> ClusterObjects {
        if source.filenames.isEmpty {
            return try await APISource.load(source, namespaces: namespaces, selector: selector)
        }
        var objects = ClusterObjects()
        var readStdin = false
        for name in source.filenames {
            let bytes: [UInt8]
            if name == "-" {
                if readStdin { throw CLIError(.usage, "-f - given more than once: standard input can be read only once") }
                readStdin = true
                bytes = try readAll(fd: 0, name: "<stdin>")
            } else {
                let fd = open(name, O_RDONLY | O_CLOEXEC)
                guard fd >= 0 else {
                    var isDir: ObjCBool = false
                    if FileManager.default.fileExists(atPath: name, isDirectory: &isDir) {
                        throw CLIError(.noInput, "\(name): cannot read \(isDir.boolValue ? "a directory" : "the file (permission denied?)")")
                    }
                    throw CLIError(.noInput, "\(name): no such file")
                }
                defer { close(fd) }
                bytes = try readAll(fd: fd, name: name)
            }
            do {
                try DocumentLoader.load(bytes, source: name == "-" ? "<stdin>" : name, into: &objects)
            } catch {
                throw CLIError(.dataError, error.description)
            }
        }
        return objects
    }

    /// Reads a whole file or pipe straight into one buffer (inputs can be hundreds of megabytes; no copies).
    static func readAll(fd: Int32, name: String) throws(CLIError) -> [UInt8] {
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
                if errno == EISDIR { throw CLIError(.noInput, "\(name): is a directory") }
                throw CLIError(.noInput, "\(name): cannot read (\(String(cString: strerror(errno))))")
            }
            if n == 0 { break }
            used += n
        }
        buffer.removeSubrange(used...)
        return buffer
    }

    static func plan(objects: ClusterObjects, resolution options: ResolutionOptions, settings: PlanSettings,
                     requested: TargetStrategy) throws(CLIError) -> RulePlan {
        var resolution = ServiceResolver(options: options).resolve(objects)
        if !objects.ignoredKinds.isEmpty {
            let kinds = objects.ignoredKinds.sorted { $0.key < $1.key }.map { "\($0.key) (\($0.value))" }.joined(separator: ", ")
            resolution.warnings.append("ignored \(objects.ignoredKinds.values.reduce(0, +)) object(s) of other kinds: \(kinds)")
        }
        do {
            return try Planner(settings: settings).plan(resolution, strategy: requested)
        } catch {
            switch error {
            case .conflicts: throw CLIError(.dataError, error.description)
            case .invalidSetting: throw CLIError(.usage, error.description)
            }
        }
    }
}

/// Messages for people go to stderr, so stdout stays the rendered file or JSON.
enum Console {
    static func error(_ message: String) {
        FileHandle.standardError.write(Data("hostnet-dnat: error: \(message)\n".utf8))
    }
    static func warning(_ message: String) {
        FileHandle.standardError.write(Data("hostnet-dnat: warning: \(message)\n".utf8))
    }
    static func note(_ message: String) {
        FileHandle.standardError.write(Data("hostnet-dnat: \(message)\n".utf8))
    }
    static func out(_ text: String) {
        FileHandle.standardOutput.write(Data(text.utf8))
    }

    /// Runs a command body, turning our errors into a message and a sysexits code (never a stack trace).
    static func run(_ body: () async throws -> Void) async throws {
        do {
            try await body()
        } catch let e as CLIError {
            error(e.message)
            throw ExitCode(e.status)
        }
    }
}
