import ArgumentParser
import Foundation
#if canImport(Glibc)
import Glibc
#endif
import KubeObjects
import RulePlanning
import ServiceResolution
import Orchestration
import KubernetesAPI

/// The CLI's door to the pipeline (Orchestration): flags in, values out.
enum Pipeline {
    static func loadObjects(_ source: SourceOptions, namespaces: [String], selector: String?) async throws(CLIError) -> ClusterObjects {
        let objectSource = source.objectSource(namespaces: namespaces, selector: selector)
        for w in ObjectLoading.warnings(objectSource) { Console.warning(w) }
        do { return try await ObjectLoading.load(objectSource, maxInputBytes: source.maxInputBytes) } catch {
            throw CLIError(error)
        }
    }

    static func plan(objects: ClusterObjects, resolution options: ResolutionOptions, settings: PlanSettings) throws(CLIError) -> RulePlan {
        do { return try Planning.plan(objects, options: options, settings: settings) } catch { throw CLIError(error) }
    }
}

extension SourceOptions {
    func objectSource(namespaces: [String], selector: String?) -> ObjectSource {
        if filenames.isEmpty {
            return .api(KubernetesSourceOptions(kubeconfig: kubeconfig, context: context, namespaces: namespaces,
                                                labelSelector: selector))
        }
        return .files(filenames)
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
