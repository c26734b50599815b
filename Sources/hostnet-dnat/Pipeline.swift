import ArgumentParser
import Foundation
#if canImport(Glibc)
import Glibc
#endif
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
                bytes = try readAll(fd: 0, name: "<stdin>", limit: source.maxInputBytes)
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
                bytes = try readAll(fd: fd, name: name, limit: source.maxInputBytes)
            }
            do {
                try DocumentLoader.load(bytes, source: name == "-" ? "<stdin>" : name, into: &objects)
            } catch {
                throw CLIError(.dataError, error.description)
            }
        }
        return objects
    }

    /// Reads a whole file or pipe into one buffer, never more than `--max-input-bytes`.
    static func readAll(fd: Int32, name: String, limit: Int) throws(CLIError) -> [UInt8] {
        do {
            return try InputReader.readAll(fd: fd, name: name, limit: limit)
        } catch {
            switch error {
            case .tooLarge: throw CLIError(.dataError, error.description)
            case .isDirectory, .failed: throw CLIError(.noInput, error.description)
            }
        }
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
///
/// Every message is made printable here, whatever it quotes: control characters (escape sequences that
/// would colour or rewrite the terminal) become `\u{1b}`, and a line break that does not start an indented
/// continuation line becomes one, so no input can forge a `hostnet-dnat:` line of its own.
enum Console {
    static func error(_ message: String) { _ = write(2, "hostnet-dnat: error: \(printable(message))\n") }
    static func warning(_ message: String) { _ = write(2, "hostnet-dnat: warning: \(printable(message))\n") }
    static func note(_ message: String) { _ = write(2, "hostnet-dnat: \(printable(message))\n") }

    /// Writes to stdout; a failed write (a full disk, a closed descriptor) is exit 74, never a crash.
    static func out(_ text: String) throws(CLIError) {
        if let why = write(1, text) { throw CLIError(.ioError, "cannot write to standard output (\(why))") }
    }

    static func printable(_ message: String) -> String {
        var out = String.UnicodeScalarView()
        let scalars = Array(message.unicodeScalars)
        for (i, u) in scalars.enumerated() {
            if u == "\n" {
                out.append(u)
                let indented = i + 2 < scalars.count && scalars[i + 1] == " " && scalars[i + 2] == " "
                if !indented { out.append(contentsOf: "  ".unicodeScalars) }
            } else if u.value < 0x20 || (0x7F...0x9F).contains(u.value) {
                out.append(contentsOf: "\\u{\(String(u.value, radix: 16))}".unicodeScalars)
            } else {
                out.append(u)
            }
        }
        return String(out)
    }

    /// Writes all of `text` to `fd`; returns why it could not, or nil.
    static func write(_ fd: Int32, _ text: String) -> String? {
        let bytes = Array(text.utf8)
        var done = 0
        while done < bytes.count {
            let n = bytes.withUnsafeBytes { Glibc.write(fd, $0.baseAddress! + done, $0.count - done) }
            if n < 0 {
                if errno == EINTR { continue }
                return String(cString: strerror(errno))
            }
            done += n
        }
        return nil
    }

    /// A closed stdin, stdout or stderr (`>&-`) would be reused by the next file or socket we open, and
    /// our output would land in it. Park a read-only /dev/null there instead: reads see end-of-file,
    /// writes fail (and are reported) instead of going somewhere else.
    static func guardStandardDescriptors() {
        for fd: Int32 in 0...2 where fcntl(fd, F_GETFD) == -1 && errno == EBADF {
            let null = open("/dev/null", O_RDONLY)
            if null >= 0 && null != fd { dup2(null, fd); close(null) }
        }
    }

    /// Runs a command body, turning our errors into a message and a sysexits code (never a stack trace).
    static func run(_ body: () async throws -> Void) async throws {
        guardStandardDescriptors()
        do {
            try await body()
        } catch let e as CLIError {
            error(e.message)
            throw ExitCode(e.status)
        }
    }
}
