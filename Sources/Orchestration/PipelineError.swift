/// A failure of the pipeline with the exit status the CLI uses (sysexits.h) and a sentence for people.
public struct PipelineError: Error, Sendable, Equatable, CustomStringConvertible {
    public var exitCode: Int32
    public var message: String

    public init(_ status: ExitStatus, _ message: String) { self.exitCode = status.rawValue; self.message = message }
    public init(code: Int32, _ message: String) { self.exitCode = code; self.message = message }

    public var description: String { message }
}

/// sysexits(3) codes, so scripts can tell a typo from bad data from a missing permission.
public enum ExitStatus: Int32, Sendable {
    case differs = 1
    case usage = 64
    case dataError = 65
    case noInput = 66
    case unavailable = 69
    case software = 70
    case cantCreate = 73
    case ioError = 74
    case tempFail = 75
    case noPermission = 77
}
